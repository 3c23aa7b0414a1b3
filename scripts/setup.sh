#!/usr/bin/env bash
# Sets up everything the project needs: Debian packages (as root), the virtual environment
# .venv with torch, and the project itself (editable, with test extras).
# Idempotent and fast on re-runs; can be run from any directory.
set -euo pipefail

# Debian packages the project needs at run time or in tests (PulseAudio: virtual sound devices,
# tests/pulse.py and scripts/virtual-audio.sh; espeak-ng: speech for `llvc make-dataset`;
# chromium: the dashboard's browser tests, driven by playwright, whose own browser download is
# never used: ../shared/notes/browser.md).
APT_PACKAGES="libsndfile1 libportaudio2 iproute2 nftables pulseaudio pulseaudio-utils libasound2-plugins espeak-ng chromium"
# The CPU build of torch that lies on this machine's disk; any other spec may download a
# multi-GB CUDA build. Only installed when the venv cannot already import torch.
TORCH_SPEC="torch==2.13.0"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=.venv
STAMP=$VENV/.setup-stamp

log() { echo "setup: $*"; }

# (a) Debian packages, only those missing, only as root.
missing=()
for pkg in $APT_PACKAGES; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        log "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        log "not root: skipping apt; install these yourself if needed: ${missing[*]}"
    fi
fi

# (b) The virtual environment.
if [[ ! -x $VENV/bin/python ]]; then
    PY=""
    if command -v python3.11 >/dev/null 2>&1; then
        PY=python3.11
    elif command -v python3 >/dev/null 2>&1 &&
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        PY=python3
    else
        echo "setup: need Python 3.11 or newer (python3.11 or python3)" >&2
        exit 1
    fi
    venv_args=()
    if "$PY" -c 'import torch' >/dev/null 2>&1; then
        log "$PY already has torch: creating $VENV with --system-site-packages to reuse it"
        venv_args+=(--system-site-packages)
    fi
    log "creating $VENV with $PY"
    "$PY" -m venv "${venv_args[@]}" "$VENV"
    rm -f "$STAMP"
fi

# (c) torch, unless the venv can already import it (importing torch takes a second: once only).
torch_version() { "$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null; }
if ! TORCH_VERSION=$(torch_version); then
    log "installing $TORCH_SPEC"
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
    TORCH_VERSION=$(torch_version) || { echo "setup: torch still cannot be imported after installing $TORCH_SPEC" >&2; exit 1; }
fi

# (d) The project itself, only when pyproject.toml is newer than the stamp.
if [[ ! -f $STAMP || pyproject.toml -nt $STAMP ]] ||
    ! "$VENV/bin/python" -c 'import common, pytest, pytest_timeout' >/dev/null 2>&1; then
    log "installing the project (pip install -e '.[test]')"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
    touch "$STAMP"
fi

log "ready: $VENV ($("$VENV/bin/python" --version 2>&1)), torch $TORCH_VERSION, llvc-pipeline installed editable with test extras"
