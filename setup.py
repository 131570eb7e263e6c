"""Build pyvae: setuptools drives CMake (CMakeLists.txt is the one description of the native build).

Install with ``pip install --no-build-isolation .`` (or ``-e .``): the extension is compiled against
the torch that is already installed, which is never replaced or downloaded by this build.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only on a misconfigured machine
    raise SystemExit(
        "pyvae builds against an installed torch, and none is importable here.\n"
        "Install one first (e.g. `pip install torch==2.13.0` for the CPU build), then run\n"
        "`pip install --no-build-isolation .`"
    ) from exc

ROOT = Path(__file__).parent.resolve()
VERSION = "0.1.0"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        from torch.utils import cpp_extension

        ext_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        # A fixed build folder per (python, torch) keeps rebuilds incremental across pip runs.
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
        build_dir = ROOT / "build" / f"cmake-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        has_cuda = torch.version.cuda is not None
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYVAE_VERSION={VERSION}",
            "-DPYVAE_TORCH_INCLUDE_DIRS=" + ";".join(cpp_extension.include_paths()),
            "-DPYVAE_TORCH_LIBRARY_DIR=" + cpp_extension.library_paths()[0],
            f"-DPYVAE_TORCH_CXX11_ABI={'ON' if torch._C._GLIBCXX_USE_CXX11_ABI else 'OFF'}",
            f"-DPYVAE_TORCH_HAS_CUDA={'ON' if has_cuda else 'OFF'}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('PYVAE_BUILD_TYPE', 'Release')}",
        ]
        if os.environ.get("PYVAE_CUDA_ARCHS"):
            args.append(f"-DPYVAE_CUDA_ARCHS={os.environ['PYVAE_CUDA_ARCHS']}")
        if shutil.which("nvcc") is None and Path("/usr/local/cuda/bin/nvcc").exists():
            args.append("-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc")
        if shutil.which("ninja") and not (build_dir / "Makefile").exists():
            args.append("-GNinja")
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(
    name="pyvae",
    version=VERSION,
    description="Fused GPU/CPU kernels for variational autoencoders",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # Every package under pyvae/, plus the top-level kernels/ folder installed as pyvae.kernels (a
    # top-level `kernels` would clash with another PyPI package). A source checkout and an editable
    # install find kernels/ through pyvae/__init__.py instead.
    packages=find_packages(include=["pyvae", "pyvae.*"]) + ["pyvae.kernels", "pyvae.kernels.contracts"],
    package_dir={"pyvae.kernels": "kernels"},
    ext_modules=[CMakeExtension("pyvae._C")],
    cmdclass={"build_ext": CMakeBuild},
    # torch is required but not declared: declaring it lets pip "upgrade" a CPU torch to a CUDA
    # wheel of several GB; setup.py refuses to build without one instead.
    # The training CLI (`pyvae train`) needs tqdm, matplotlib and scikit-learn (its bundled digits).
    install_requires=["numpy", "tqdm"],
    extras_require={"triton": ["triton"], "train": ["matplotlib", "scikit-learn"],
                    "bench": ["matplotlib", "pytest-benchmark", "vector-quantize-pytorch", "diffusers"],
                    "test": ["pytest", "scipy", "numpy", "scikit-learn", "matplotlib", "vector-quantize-pytorch",
                             "diffusers"], "diffusers": ["diffusers"]},
    entry_points={"console_scripts": ["pyvae = pyvae.__main__:main"]},
    zip_safe=False,
)
