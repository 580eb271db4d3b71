# Sourced by scripts/run and scripts/test: find Python 3.13 and make .venv.
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
