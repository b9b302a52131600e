"""examples/python end to end, with the commands of its README: register.py, the MT5 API as a
process (behind `permiso sidecar`, then standalone in jwt and introspection modes), and the
trading dashboard as a process against it."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import CALLER_ADDRESS, PERMISO_BIN, REPO, Admin, Stack, client_from, free_port, wait_until

from permiso import TokenClient

EXAMPLE = REPO / "examples" / "python"


def register(admin: Admin) -> dict[str, str]:
    """`eval "$(python examples/python/register.py)"`, read back from its export lines."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLE / "register.py"), "--admin-url", admin.url],
        env={"PATH": "/usr/bin:/bin", "PERMISO_ADMIN_API_KEY": admin.key},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    env = {}
    for line in out.splitlines():
        words = shlex.split(line)
        assert words[0] == "export", line
        key, _, value = words[1].partition("=")
        env[key] = value
    return env


def start_app(stack: Stack, mode: str, env: dict[str, str]) -> str:
    port = free_port()
    stack.process(
        f"mt5-{mode}",
        [sys.executable, str(EXAMPLE / "mt5_api.py"), "--mode", mode, "--port", str(port)],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/health", timeout=1).json()["auth_mode"] == mode, what=f"mt5 api ({mode})")
    return url


def sidecar_config(tmp: Path, admin: Admin, app_port: int) -> tuple[Path, str, str]:
    """The example's sidecar.toml with this test's ports and paths."""
    port, health = free_port(), free_port()
    text = (EXAMPLE / "sidecar.toml").read_text()
    for key, value in {
        "listen": f"127.0.0.1:{port}",
        "upstream": f"127.0.0.1:{app_port}",
        "snapshot_file": str(tmp / "snapshot.json"),
        "admin_listen": f"127.0.0.1:{health}",
        "admin_url": admin.url,
    }.items():
        text, n = re.subn(rf'^{key} = ".*"$', f'{key} = "{value}"', text, flags=re.M)
        assert n == 1, key
    path = tmp / "sidecar.toml"
    path.write_text(text)
    return path, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{health}"


def dashboard(api: str, env: dict[str, str]) -> str:
    run = subprocess.run(
        [sys.executable, str(EXAMPLE / "trading_dashboard.py"), "--api", api],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_the_example_end_to_end(stack: Stack, tmp_path: Path) -> None:
    admin = stack.admin()
    env = register(admin)
    assert env["PERMISO_ISSUER"] == admin.url and env["PERMISO_TOKEN_URL"] == admin.token_url
    assert register(admin).keys() == env.keys()  # runs again: new credentials for the same services
    env = register(admin)

    # Behind the sidecar.
    app_url = start_app(stack, "sidecar", env)
    config, sidecar_url, health = sidecar_config(tmp_path, admin, int(app_url.rsplit(":", 1)[1]))
    stack.process(
        "sidecar",
        [str(PERMISO_BIN), "sidecar", "--config", str(config)],
        env={"PERMISO_SYNC_KEY": env["PERMISO_SYNC_KEY"]},
    )
    wait_until(lambda: httpx.get(f"{health}/readyz", timeout=1).status_code == 200, what="sidecar")
    out = dashboard(sidecar_url, env)
    assert "6 calls, 1 token fetched; 0 unexpected answers" in out, out
    assert 'scope=\\"account:balance' in out or 'scope=\\"account:read account:balance' in out, out
    # The trusted ops console may read the admin statistics; the API key works as well.
    ops = TokenClient(env["PERMISO_TOKEN_URL"], env["OPS_CLIENT_ID"], env["OPS_CLIENT_SECRET"])
    with client_from(CALLER_ADDRESS, auth=ops.auth) as http:
        r = http.get(f"{sidecar_url}/api/v1/admin/stats")
        assert r.status_code == 200 and r.json()["requested_by"] == env["OPS_CLIENT_ID"]
    with client_from(CALLER_ADDRESS, headers={"Authorization": f"Bearer {env['DASHBOARD_KEY']}"}) as http:
        r = http.get(f"{sidecar_url}/api/v1/trades")
        assert r.status_code == 200 and len(r.json()["trades"]) == 1
    # The app itself refuses identity headers that do not come from the sidecar's address.
    with client_from(
        "127.0.0.2", headers={"X-Permiso-Service-Id": env["OPS_CLIENT_ID"], "X-Permiso-Trusted": "true"}
    ) as http:
        assert http.get(f"{app_url}/api/v1/admin/stats").status_code == 401

    # Standalone: the dashboard calls the app directly; the app checks the token itself.
    for mode in ("jwt", "introspection"):
        url = start_app(stack, mode, env)
        out = dashboard(url, env)
        assert "6 calls, 1 token fetched; 0 unexpected answers" in out, (mode, out)
        assert 'scope=\\"account:read account:balance\\"' in out, out  # the app's own refusal names both
        with client_from(CALLER_ADDRESS, auth=ops.auth) as http:
            assert http.get(f"{url}/api/v1/admin/stats").status_code == 200
    ops.close()
