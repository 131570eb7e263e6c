"""``python -m pyvae``: version, how the extension was built, and the backends on each device."""
from __future__ import annotations

import platform
import sys

import torch

from . import __version__, backends


def main() -> int:
    print(f"pyvae {__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton
        print(f"triton {triton.__version__}" + ("  (interpreter: TRITON_INTERPRET=1)" if backends.triton_interpreted() else ""))
    except ImportError:
        print("triton: not installed")
    ext = backends.native_extension()
    if ext is None:
        print("extension pyvae._C: NOT BUILT (the cpu and cuda backends are unavailable)")
    else:
        cuda = f"yes, for sm_{ext.cuda_archs.replace(',', ', sm_')}" if ext.has_cuda else "no"
        print(f"extension pyvae._C {ext.version}: CPU kernels yes; CUDA kernels {cuda}")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for dev in devices:
        name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else platform.processor() or "cpu"
        autos = ", ".join(f"{op} -> {backends.resolve('auto', torch.device(dev), op)}"
                          for op in ("reparam_kl", "likelihood", "vq"))
        print(f"{dev} ({name}): backends {backends.available(dev)}; auto: {autos}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
