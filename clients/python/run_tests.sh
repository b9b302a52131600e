#!/usr/bin/env bash
# The Python client's tests (clients/python/tests, the example's end to end test included),
# against real Permiso processes on loopback. Makes a venv under <repo>/target/python-venv the
# first time (python3 >= 3.10 with venv; PyPI for the packages), installs this package
# (editable, with its fastapi and test extras) and the example's requirements into it, then
# runs ruff (lint and format), mypy --strict on the package, then pytest -q. Arguments go to
# pytest.
#
#   PERMISO_BIN   the permiso binary (default <repo>/target/debug/permiso)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$repo/target/python-venv"
export PERMISO_BIN="${PERMISO_BIN:-$repo/target/debug/permiso}"

if [ ! -x "$PERMISO_BIN" ]; then
  echo "run_tests.sh: no permiso binary at $PERMISO_BIN (cargo build first, or set PERMISO_BIN)" >&2
  exit 2
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "run_tests.sh: python3 >= 3.10 is needed, found $(python3 --version 2>&1)" >&2
  exit 2
}

# A venv left half made (no pip in it) is made again.
if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  rm -rf "$venv"
  python3 -m venv "$venv"
fi

# Installed again only when what it is installed from changed (the package is editable, so its
# code is always the working tree's).
stamp="$venv/.permiso-installed"
want="$(cat "$here/pyproject.toml" "$repo/examples/python/requirements.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    -e "$here[fastapi,test]" -r "$repo/examples/python/requirements.txt"
  echo "$want" > "$stamp"
fi

cd "$here"
# The package is typed (py.typed) and kept to one style: checked before the tests run.
"$venv/bin/ruff" check -q src tests "$repo/examples/python"
"$venv/bin/ruff" format -q --check src tests "$repo/examples/python"
"$venv/bin/mypy" --strict src/permiso | tail -1
exec "$venv/bin/python" -m pytest -q "$@"
