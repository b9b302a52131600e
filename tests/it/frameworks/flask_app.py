"""A Flask upstream for the differential path test (tests/it/paths.rs).

Each handler answers with its own name and the request-target it received, so the test can
tell which handler a path reached behind the sidecar. `--lower` wraps the app in a WSGI
middleware that lower-cases PATH_INFO, the way a case-insensitive server (IIS, a Windows
file system, some proxies) reads paths. Prints the port it bound, then serves.
"""

import sys

from flask import Flask, jsonify, request
from werkzeug.serving import WSGIRequestHandler, make_server

app = Flask(__name__)


def reply(name):
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or ""
    resp = jsonify(handler=name, path=request.path, raw=raw)
    # In headers too, so a HEAD request (no body) shows which handler ran.
    resp.headers["X-Handler"] = name
    resp.headers["X-Raw-Target"] = raw
    return resp


@app.route("/health")
@app.route("/health/<path:rest>")
def health(rest=None):
    return reply("health")


@app.route("/api/v1/account")
@app.route("/api/v1/account/<path:rest>")
def account(rest=None):
    return reply("account")


@app.route("/api/v1/account/balance")
@app.route("/api/v1/account/balance/<path:rest>")
def balance(rest=None):
    return reply("balance")


# Public in the sidecar's routes; exact path only, so anything below it is served by the
# /api/v1/account catch-all.
@app.route("/api/v1/account/help")
def help_page():
    return reply("help")


@app.route("/api/v1/trades")
@app.route("/api/v1/trades/<path:rest>")
def trades(rest=None):
    return reply("trades")


@app.route("/api/v1/admin")
@app.route("/api/v1/admin/<path:rest>")
def admin(rest=None):
    return reply("admin")


class Lower:
    def __init__(self, inner):
        self.inner = inner

    def __call__(self, environ, start_response):
        environ["PATH_INFO"] = environ.get("PATH_INFO", "").lower()
        return self.inner(environ, start_response)


if __name__ == "__main__":
    wsgi = Lower(app) if "--lower" in sys.argv else app
    # Keep-alive towards the sidecar, as a production server would.
    WSGIRequestHandler.protocol_version = "HTTP/1.1"
    server = make_server("127.0.0.1", 0, wsgi, threaded=True)
    print(server.server_port, flush=True)
    server.serve_forever()
