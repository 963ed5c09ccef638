# shellcheck shell=bash
# Sourced by the scripts in this folder; not a command of its own.
#
# ensure_venv SPEC: make sure .venv (in the repository root, the current
# directory) exists and has SPEC (".", ".[dev]") installed editable. The
# install is skipped when it already happened for the same pyproject.toml;
# delete .venv to start over.

ensure_venv() {
    local spec=$1
    local python=${PYTHON:-python3}

    if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c '' 2>/dev/null; then
        if ! command -v "$python" >/dev/null 2>&1; then
            echo "${0##*/}: $python not found; install Python 3.11 or newer" >&2
            exit 1
        fi
        if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            echo "${0##*/}: taskq needs Python 3.11 or newer; $python is $("$python" -V 2>&1)" >&2
            echo "${0##*/}: set PYTHON to another interpreter, e.g. PYTHON=python3.11" >&2
            exit 1
        fi
        echo "${0##*/}: creating .venv with $("$python" -V 2>&1)" >&2
        rm -rf .venv
        "$python" -m venv .venv
    fi

    local extras=${spec//[^a-z]/}
    local stamp=".venv/.taskq-installed-${extras:-base}"
    local want
    want="$(cat pyproject.toml)"
    if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
        echo "${0##*/}: installing taskq ($spec) into .venv" >&2
        .venv/bin/python -m pip install --quiet --disable-pip-version-check --editable "$spec"
        printf '%s' "$want" >"$stamp"
    fi
}
