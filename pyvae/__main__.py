"""``python -m pyvae`` (and the ``pyvae`` console script): with no arguments, the install report
(version, how the extension was built, the backends on each device); ``pyvae train ...`` trains a
model (see :mod:`pyvae.train`)."""
from __future__ import annotations

import platform
import sys

import torch

from . import __version__, backends


USAGE = "usage: pyvae [train ...]   (no command: the install report; `pyvae train --help` for training)"


def main(argv: list[str] | None = None) -> int:
    """Dispatches ``argv`` (default: the command line) and returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        return report()
    if argv[0] == "train":
        from . import train  # matplotlib, tqdm and scikit-learn load only for training

        return train.main(argv[1:])
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    print(f"pyvae: error: unknown command {argv[0]!r}; {USAGE}", file=sys.stderr)
    return 2


def report() -> int:
    """Prints the install report."""
    print(f"pyvae {__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton
        print(f"triton {triton.__version__}" + ("  (interpreter: TRITON_INTERPRET=1)" if backends.triton_interpreted() else ""))
    except ImportError:
        print("triton: not installed")
    ext = backends.native_extension()
    if backends.native_extension_error() is not None:
        print(f"extension pyvae._C: FAILED TO LOAD: {backends.native_extension_error()}\n"
              f"  the cpu and cuda backends are off; {backends.REBUILD}")
    elif ext is None:
        print(f"extension pyvae._C: not installed ({backends.MISSING}): the cpu and cuda backends are unavailable")
    else:
        cuda = f"yes, for sm_{ext.cuda_archs.replace(',', ', sm_')}" if ext.has_cuda else "no"
        print(f"extension pyvae._C {ext.version}: CPU kernels yes; CUDA kernels {cuda}")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for dev in devices:
        name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else platform.processor() or "cpu"
        autos = ", ".join(f"{op} -> {backends.resolve('auto', torch.device(dev), op)}" for op in backends.FAMILIES)
        print(f"{dev} ({name}): backends {backends.available(dev)}; auto: {autos}")
    for op in backends.FAMILIES:
        for backend, reason in backends.unavailable_reasons(op).items():
            if backend == "triton" or backends.native_extension_error() is None:  # the extension's said once above
                print(f"{op}: backend {backend!r} is off: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
