#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh bench [args]   benchmark suite on this machine's default device (table + bench/results/)
#   ./run.sh test  [args]   the test suite (pytest)
# Each first makes sure ./.venv exists with what it needs and that this checkout is installed in it
# editable, its extension built (again only when native or build files change). The venv sees the
# system's packages, so a machine whose Python already has (CUDA) torch and Triton uses them; torch
# is installed only if none is importable, and then the CPU build torch==2.13.0, never a CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")"

usage() { echo "usage: ./run.sh {bench|test} [args...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
cmd=$1; shift

PY=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "[run.sh] creating $VENV"
  "$PY" -m venv --system-site-packages "$VENV"
  # When $PY is itself a virtual environment (as on the GPU machines), --system-site-packages
  # reaches only its base interpreter: list its own site-packages too, so its torch is used.
  parent_sites=$("$PY" -c "import site, sys; print('\n'.join(site.getsitepackages()) if sys.prefix != sys.base_prefix else '')")
  if [ -n "$parent_sites" ]; then
    site_dir=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$parent_sites" > "$site_dir/_pyvae_parent_env.pth"
  fi
fi
VPY="$VENV/bin/python"

pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }
# absent MODULE:PACKAGE...: the PACKAGEs whose MODULE is not installed (one Python process, which
# looks the modules up without importing them: a run after the first starts in seconds)
absent() { "$VPY" -c 'import importlib.util as u, sys
print(" ".join(a.split(":", 1)[1] for a in sys.argv[1:] if u.find_spec(a.split(":", 1)[0]) is None))' "$@"; }

if [ -n "$(absent torch:torch)" ]; then
  echo "[run.sh] no torch importable: installing torch==2.13.0 (CPU build)"
  pip_install torch==2.13.0
fi
read -r -a missing <<< "$(absent triton:triton numpy:numpy scipy:scipy pytest:pytest pytest_benchmark:pytest-benchmark \
  matplotlib:matplotlib tqdm:tqdm psutil:psutil ninja:ninja setuptools:setuptools wheel:wheel hypothesis:hypothesis)"
if [ ${#missing[@]} -gt 0 ]; then
  echo "[run.sh] installing ${missing[*]}"
  pip_install "${missing[@]}"
fi

# pyvae is installed editable (`pip install -e .`): the venv imports this checkout's pyvae/ (and its
# kernels/ as pyvae.kernels), so Python edits need no reinstall. Only the extension pyvae._C, built in
# place into pyvae/, is rebuilt: when a native or build file changed since the last install, when
# pyvae._C does not load here (never built, another torch), or when the venv's pyvae is not this
# checkout (a non-editable install, another clone). The build is incremental (build/cmake-*/).
stamp=build/.editable-stamp
root=$(pwd -P)
installed=$(cd / && "$root/$VPY" -c "import os, pyvae, pyvae._C; print(os.path.realpath(pyvae.__file__))" 2>/dev/null || true)
if [ ! -f "$stamp" ] || [ "$installed" != "$root/pyvae/__init__.py" ] \
   || [ -n "$(find setup.py pyproject.toml CMakeLists.txt csrc -newer "$stamp" -print -quit)" ]; then
  echo "[run.sh] building pyvae._C (pip install --no-build-isolation -e .)"
  PATH="$PWD/$VENV/bin:$PATH" "$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
  mkdir -p build && touch "$stamp"
fi

# scikit-learn (the CLI's bundled digits), vector-quantize-pytorch (what pyvae.nn.VectorQuantize
# is tested and benchmarked against) and diffusers (pyvae.nn.DiagonalGaussianDistribution's peer),
# where they can be fetched: the tests and rows that need them are skipped, with a reason, on a
# machine without network that lacks them.
for pkg in $(absent sklearn:scikit-learn vector_quantize_pytorch:vector-quantize-pytorch==1.32.0 \
             diffusers:diffusers==0.42.0); do
  pip_install "$pkg" || echo "[run.sh] $pkg unavailable: what needs it is skipped"
done

case "$cmd" in
  bench) export PYVAE_BENCH_COMMAND="./run.sh bench${*:+ $*}"; cd bench && exec "../$VPY" run.py "$@" ;;
  test)  exec "$VPY" -m pytest "$@" ;;
  *) usage ;;
esac
