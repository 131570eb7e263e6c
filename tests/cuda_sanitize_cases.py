"""A small run of every CUDA kernel, for compute-sanitizer (bench/gpu_check.sh). Not a pytest module
(no test_ prefix).

    python tests/cuda_sanitize_cases.py [--trim] [--cpu] [FAMILY...]   (default: every family of pyvae.registry)

The cases of op family ``<name>`` are ``families.<name>.sanitize``. ``--trim`` keeps the shapes
that reach every code path (one element per row, ragged rows, rows longer than a block) and two
dtypes, so that racecheck fits a short GPU session. ``--cpu`` runs the same cases on the cpu
backend: a check of the cases themselves where there is no GPU.
"""
import importlib
import sys

import torch

from pyvae import registry


def main(argv: list[str]) -> int:
    trim, device = "--trim" in argv, "cpu" if "--cpu" in argv else "cuda"
    families = [registry.family(name) for name in argv if not name.startswith("--")] or registry.FAMILIES
    torch.manual_seed(0)
    for family in families:
        importlib.import_module(family.cases).sanitize(device, trim)
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"sanitize cases done: {family.name}{' (trimmed)' if trim else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
