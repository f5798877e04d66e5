#!/usr/bin/env bash
# What a new user gets from `pip install`: build a wheel from this checkout, install it in a
# fresh venv, then
#   1. the base install (no extras) is a broker with no torch: --version, --help, a broker that
#      starts and stops, and `import torch` fails;
#   2. with the torch and mooncake extras (torch pinned in the same command), `weightstream demo`
#      runs end to end, checked bit for bit.
# Runs from a temporary directory, so the installed package is what gets imported, not the tree.
#   scripts/test_wheel.sh          (make test-wheel; uses .venv's pip to build)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
TORCH_PIN="torch==2.13.0"
WORK=$(mktemp -d -t weightstream-wheel-XXXXXX)
trap 'rm -rf "$WORK"' EXIT

echo "test-wheel: building the wheel"
"${VENV:-.venv}"/bin/pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/weightstream-*.whl)
"$PYTHON" -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/pip" install -q --disable-pip-version-check)
cd "$WORK"

echo "test-wheel: base install (broker only, no torch)"
"${PIP[@]}" "$WHEEL"
"$WORK/venv/bin/weightstream" --version
"$WORK/venv/bin/weightstream" --help >/dev/null
if "$WORK/venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "test-wheel: FAIL torch is installed by the base install" >&2
  exit 1
fi
"$WORK/venv/bin/weightstream" broker --endpoint tcp://127.0.0.1:0 --http-port 0 \
  --ready-file "$WORK/broker.json" >"$WORK/broker.log" 2>&1 &
BROKER=$!
for _ in $(seq 100); do [ -f "$WORK/broker.json" ] && break; sleep 0.1; done
kill -TERM "$BROKER"
wait "$BROKER" || { echo "test-wheel: FAIL the broker exited non-zero"; cat "$WORK/broker.log"; exit 1; }
[ -f "$WORK/broker.json" ] || { echo "test-wheel: FAIL no broker"; cat "$WORK/broker.log"; exit 1; }

echo "test-wheel: with the torch and mooncake extras"
"${PIP[@]}" "$TORCH_PIN" "$WHEEL[torch,mooncake]"
MC_LOG_LEVEL=ERROR "$WORK/venv/bin/weightstream" demo --size 16MB --versions 2
echo "test-wheel: OK (installed from $(basename "$WHEEL"), not from $REPO)"
