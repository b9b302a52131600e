"""Real Permiso processes on loopback for the tests: an admin plane (`permiso admin`), a sidecar
(`permiso sidecar`) and FastAPI apps served by uvicorn in a thread. Each test gets its own
temporary directory, ports, database and processes, and every process is stopped at teardown.

The binary is $PERMISO_BIN, by default <repo>/target/debug/permiso.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[3]
PERMISO_BIN = Path(os.environ.get("PERMISO_BIN") or REPO / "target" / "debug" / "permiso")
#: Callers of the sidecar (and of apps directly) bind this source address, so the sidecar's
#: own connections to the app (from 127.0.0.1) are the only ones from 127.0.0.1.
CALLER_ADDRESS = "127.0.0.3"
FORGER_ADDRESS = "127.0.0.2"


def pytest_configure(config: pytest.Config) -> None:
    if not PERMISO_BIN.is_file():
        raise pytest.UsageError(f"no permiso binary at {PERMISO_BIN}: build it (cargo build) or set PERMISO_BIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = pred()
            if v:
                return v
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def client_from(address: str, **kw: Any) -> httpx.Client:
    """An httpx client whose connections leave from `address` (all of 127/8 is loopback)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10, **kw)


def async_client_from(address: str, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address=address), timeout=10, **kw)


class FakeClock:
    """Injected into clients and verifiers: tests move time instead of sleeping."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Process:
    def __init__(
        self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ):
        self.name, self.log_path = name, log
        self._log = open(log, "wb")
        full_env = {**os.environ, "RUST_LOG": "info", "NO_COLOR": "1", **(env or {})}
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Admin:
    """`permiso admin` with its own database; `settings` are [admin_plane] keys."""

    def __init__(self, directory: Path, tls: Any = None, **settings: Any) -> None:
        """`tls`: a tls_certs.Pki, to serve HTTPS with client certificates optional."""
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.key = "adm_" + secrets.token_urlsafe(32)
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.verify: Any = ssl.create_default_context(cafile=str(tls.ca)) if tls else True
        lines = [
            "[admin_plane]",
            f"listen = {_toml(f'127.0.0.1:{self.port}')}",
            f"database = {_toml(str(directory / 'permiso.db'))}",
        ]
        lines += [f"{k} = {_toml(v)}" for k, v in settings.items()]
        if tls:
            lines += [
                "[admin_plane.tls]",
                f"cert_file = {_toml(str(tls.server_cert))}",
                f"key_file = {_toml(str(tls.server_key))}",
                f"client_ca_file = {_toml(str(tls.ca))}",
                'client_auth = "optional"',
            ]
        self.config = directory / "admin.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.http = httpx.Client(
            base_url=self.url, timeout=10, headers={"X-Admin-Api-Key": self.key}, verify=self.verify
        )
        self.proc: Process | None = None
        self.start()

    def start(self) -> None:
        self.proc = Process(
            "admin",
            [str(PERMISO_BIN), "admin", "--config", str(self.config)],
            self.dir / f"admin-{int(time.time() * 1000)}.log",
            env={"PERMISO_ADMIN_API_KEY": self.key},
        )
        wait_until(lambda: self.http.get("/healthz", timeout=1).status_code == 200, what="admin plane")

    def stop(self) -> None:
        """Stops the process (start() runs it again on the same port and database)."""
        if self.proc:
            self.proc.stop()

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth/token"

    def create_service(self, name: str, scopes: list[str], **fields: Any) -> dict[str, Any]:
        r = self.http.post("/auth/admin/services", json={"service_name": name, "scopes": scopes, **fields})
        assert r.status_code == 201, r.text
        return dict(r.json())

    def revoke_token(self, token: str) -> None:
        r = self.http.post("/oauth/revoke", data={"token": token})
        assert r.status_code == 200, r.text

    def rotate_signing_key(self) -> str:
        r = self.http.post("/auth/admin/signing-keys/rotate")
        assert r.status_code == 200, r.text
        return str(r.json()["new_kid"])

    def metrics(self) -> str:
        return self.http.get("/metrics", timeout=5).text

    def tokens_issued(self) -> int:
        m = re.search(r"^permiso_admin_tokens_issued_total (\d+)", self.metrics(), re.M)
        return int(m.group(1)) if m else 0

    def requests_to(self, route: str) -> int:
        """Requests the admin plane served on `route` (its metric, by route template)."""
        total = 0
        for line in self.metrics().splitlines():
            if line.startswith("permiso_admin_http_requests_total{") and f'route="{route}"' in line:
                total += int(float(line.rsplit(" ", 1)[1]))
        return total


class Sidecar:
    """`permiso sidecar` in front of `upstream`, synced from `admin` with a fresh sync key."""

    def __init__(self, directory: Path, admin: Admin, upstream: str, routes: list[dict[str, Any]]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        sync = admin.create_service(f"sidecar-sync-{secrets.token_hex(4)}", ["sync:read"])
        (directory / "sync.key").write_text(sync["api_key"] + "\n")
        self.port, self.health_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        lines = [
            "[sidecar]",
            f"listen = {_toml(f'127.0.0.1:{self.port}')}",
            f"upstream = {_toml(upstream)}",
            f"admin_listen = {_toml(f'127.0.0.1:{self.health_port}')}",
            f"snapshot_file = {_toml(str(directory / 'snapshot.json'))}",
            "[sidecar.sync]",
            f"admin_url = {_toml(admin.url)}",
            f"credential_file = {_toml(str(directory / 'sync.key'))}",
            "wait_seconds = 5",
        ]
        for r in routes:
            lines.append("[[sidecar.routes]]")
            lines += [f"{k} = {_toml(v)}" for k, v in r.items()]
        self.config = directory / "sidecar.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc = Process(
            "sidecar", [str(PERMISO_BIN), "sidecar", "--config", str(self.config)], directory / "sidecar.log"
        )
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{self.health_port}/readyz", timeout=1).status_code == 200,
            what="sidecar ready",
        )

    def wait_accepts(self, bearer: str, path: str = "/api/v1/whoami") -> None:
        """Until a change made on the admin plane (a new service, say) has reached this sidecar."""
        wait_until(
            lambda: httpx.get(self.url + path, headers={"Authorization": f"Bearer {bearer}"}).status_code != 401,
            what="the sidecar to know the credential",
        )

    def stop(self) -> None:
        self.proc.stop()


class AppServer:
    """A FastAPI (ASGI) app served by uvicorn in a thread, without proxy headers (the peer
    address stays the TCP peer's, as permiso.fastapi's sidecar mode requires)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", proxy_headers: bool = False) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(
            app,
            host=host,
            port=self.port,
            log_level="warning",
            proxy_headers=proxy_headers,
            lifespan="off",
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, what="uvicorn")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class Stack:
    """What one test started; stopped in reverse order at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._started: list[Any] = []

    def admin(self, **settings: Any) -> Admin:
        a = Admin(self.tmp / f"admin{len(self._started)}", **settings)
        self._started.append(a)
        return a

    def sidecar(self, admin: Admin, upstream: str, routes: list[dict[str, Any]]) -> Sidecar:
        s = Sidecar(self.tmp / f"sidecar{len(self._started)}", admin, upstream, routes)
        self._started.append(s)
        return s

    def serve(self, app: Any, **options: Any) -> AppServer:
        s = AppServer(app, **options)
        self._started.append(s)
        return s

    def process(
        self, name: str, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> Process:
        p = Process(name, args, self.tmp / f"{name}.log", env=env, cwd=cwd)
        self._started.append(p)
        return p

    def close(self) -> None:
        for thing in reversed(self._started):
            thing.stop()
            if isinstance(thing, Admin):
                thing.http.close()

    def behind_sidecar(self, **admin_settings: Any) -> tuple[Admin, AppServer, Sidecar, list[str]]:
        """Admin plane, the test app in sidecar mode (trusting 127.0.0.1 only), and a sidecar
        in front of it whose one route needs `mt5:call` (the app's own guards do the rest)."""
        from permiso.fastapi import PermisoAuth

        admin = self.admin(**admin_settings)
        app, seen = protected_app(lambda app: PermisoAuth.behind_sidecar(app, trusted_proxies=["127.0.0.1/32"]))
        server = self.serve(app)
        sidecar = self.sidecar(admin, f"127.0.0.1:{server.port}", [{"prefix": "/api", "scopes": ["mt5:call"]}])
        return admin, server, sidecar, seen


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def caller_json(caller: Any) -> dict[str, Any]:
    d = dataclasses.asdict(caller)
    d.pop("claims", None)
    d["scopes"] = list(d["scopes"])
    return d


def protected_app(make_auth: Callable[[Any], Any]) -> tuple[Any, list[str]]:
    """A small MT5-like FastAPI app guarded by `make_auth(app)`; `seen` lists the requests
    its handlers (not only its guards) ran, so a test can tell the app's refusals from the
    sidecar's."""
    from fastapi import Depends, FastAPI

    from permiso.fastapi import Caller

    app = FastAPI()
    auth = make_auth(app)
    seen: list[str] = []

    @app.get("/api/v1/whoami")
    async def whoami(caller: Caller = Depends(auth)) -> dict[str, Any]:
        seen.append("whoami")
        return caller_json(caller)

    @app.get("/api/v1/trades")
    async def trades(caller: Caller = Depends(auth.require_scopes("trade:read", "account:read"))) -> dict[str, Any]:
        seen.append("trades")
        return {"trades": [], "caller": caller_json(caller)}

    @app.post("/api/v1/trades")
    async def open_trade(caller: Caller = Depends(auth.require_scopes("trade:open"))) -> dict[str, Any]:
        seen.append("open")
        return {"opened": True, "caller": caller_json(caller)}

    @app.get("/api/v1/admin/stats")
    async def stats(caller: Caller = Depends(auth.require("admin:system", trusted=True))) -> dict[str, Any]:
        seen.append("stats")
        return {"stats": {}, "caller": caller_json(caller)}

    @app.get("/api/v1/admin/ping")
    async def ping(caller: Caller = Depends(auth.require_trusted())) -> dict[str, Any]:
        seen.append("ping")
        return {"pong": True}

    return app, seen
