#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine: apt packages and a pinned
# virtual environment in .venv. Safe to run again: it only redoes what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(ffmpeg espeak-ng sox libgl1 libglib2.0-0)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[install] apt packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then
  echo "[install] .venv is up to date"
  exit 0
fi
[ -d .venv ] || "$PYTHON" -m venv .venv
# pip's exit status is kept; only the noise about this machine's local package indexes is filtered out
pip_install() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip_install --upgrade pip
# torch first, exactly, from the CPU wheel; the constraints file keeps every later install from replacing it.
pip_install torch==2.13.0
# dask and ray: the distributed engines, which tests/test_engines.py runs (about 10 s more to install)
pip_install -c constraints.txt -e ".[dev,dask,ray]"
# openai-whisper without triton (see pyproject.toml); its runtime dependencies come with the project
pip_install --no-deps openai-whisper==20250625
.venv/bin/python -c "import whisper, demucs, mediapipe, prefect, silero_vad" # fail here, not later, if anything is missing
rm -f .venv/.installed-*
touch "$stamp"
echo "[install] done: $(.venv/bin/python -c 'import torch, mediapipe, prefect; print("torch", torch.__version__, "mediapipe", mediapipe.__version__, "prefect", prefect.__version__)')"
