#!/usr/bin/env bash
# Downloads, here (where pip reaches PyPI), the wheels of the benchmark's comparison library that
# the GPU machines lack (vector-quantize-pytorch and the dependencies their image does not hold)
# into ./.whl, for Python 3.12. A device call that names `.whl` in `carry` then gets them, and
# bench/gpu_check.sh installs them into /tmp/site before benchmarking. .whl is kept out of git
# (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl vector-quantize-pytorch==1.32.0 einx loguru torch-einops-utils frozendict
ls .whl
