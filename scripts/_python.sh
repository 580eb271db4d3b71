# Sourced by scripts/run, scripts/test and scripts/bench: find Python 3.13 and make .venv;
# install a Debian package a script needs when running as root.
# Does not rely on pyenv shims or shell set-up.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
find_python() {
    if command -v python3.13 >/dev/null 2>&1 && python3.13 -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null; then
        command -v python3.13; return
    fi
    local p
    for p in "$HOME"/.pyenv/versions/3.13*/bin/python3; do
        if [ -x "$p" ]; then echo "$p"; return; fi
    done
    echo "axme-fw: Python 3.13 not found (looked for python3.13 on PATH and ~/.pyenv/versions/3.13*/bin/python3); install it and retry" >&2
    exit 1
}
# ensure_venv EXTRAS: create .venv if missing, (re)install when pyproject.toml changed.
ensure_venv() {
    local extras="$1" venv="$ROOT/.venv" stamp
    if [ ! -x "$venv/bin/python" ]; then
        "$(find_python)" -m venv "$venv"
    fi
    stamp="$venv/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)-${extras:-base}"
    if [ ! -f "$stamp" ]; then
        "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT${extras:+[$extras]}"
        rm -f "$venv"/.installed-*
        touch "$stamp"
    fi
}
# debian_install PKG: apt-get install PKG when root with apt-get; 1 when it cannot.
debian_install() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
    echo "== installing $1 (Debian package)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null; }
}
# redis_ok: a redis-server binary of version 7 or newer is on PATH.
redis_ok() {
    local major
    major="$(redis-server --version 2>/dev/null | sed -n 's/.* v=\([0-9]*\)\..*/\1/p')"
    [ -n "$major" ] && [ "$major" -ge 7 ]
}
