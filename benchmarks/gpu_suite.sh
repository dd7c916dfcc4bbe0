#!/usr/bin/env bash
# One command for a fresh GPU machine (torch, torchvision and timm preinstalled, no network):
# installs the pure-Python requirements carried as wheels in .whl/ (if any), then runs
# benchmarks/gpu_suite.py and prints its summary table last. Extra arguments go to gpu_suite.py.
#
#   bash benchmarks/gpu_suite.sh --budget 570 --logs $OUT   # the speed decisions first, ~9.5 minutes
#   bash benchmarks/gpu_suite.sh --only "lever 1: max-autotune"
#   bash benchmarks/gpu_suite.sh --skip "train --compile"
# Without --budget every step runs (about 25 minutes on one H100: levers, then the trainer checks).
#
# Carrying the wheels (on a machine with network, in the repository root):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl yacs==0.1.8 braceexpand==0.1.7
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_suite.py "$@"
