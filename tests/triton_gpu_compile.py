"""Compiles every Triton kernel variant pyvae's launchers ask for, for NVIDIA GPUs, on a machine
without one, and checks each compiled variant's registers and shared memory against the limits of
the GPU it was compiled for (run by tests/test_package.py in a process of its own).

    python tests/triton_gpu_compile.py [FAMILY...]     (default: every family of pyvae.registry)

Triton's interpreter, which runs the kernels in the CPU test suite, accepts code that a GPU
compile rejects (a tl.dot block under 16, operand dtypes that differ, ...). Here the launchers run
on meta tensors with ``wrap_triton`` replaced by a recorder, so each launch gives the kernel, its
argument types and its constexprs exactly as a GPU run would; each distinct variant is then
compiled ahead of time (Triton's own ptxas) for sm_90, and the search for sm_80 too, and its cubin
read by cuobjdump (tests/kernel_resources.py). The launches of op family ``<name>`` are made by
``families.<name>.triton_launches``. Prints one line per variant (registers, shared memory, local
memory if any); exits 1 if any fails to compile or is above a device limit.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import tempfile
from types import SimpleNamespace

os.environ.pop("TRITON_INTERPRET", None)  # before Triton is imported: compile, don't interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernel_resources import Usage, report, resource_usage  # noqa: E402
from pyvae import registry  # noqa: E402

# Every variant for Hopper; the search (the one kernel whose code generation differs by
# architecture: mma on sm_80, wgmma on sm_90) for Ampere too.
TARGETS = [GPUTarget("cuda", 90, 32)]
ARCH_SENSITIVE = {"_nearest_code_kernel": [GPUTarget("cuda", 80, 32)]}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                torch.int32: "i32"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def record_launches(families) -> list[tuple[object, tuple, dict]]:
    """(kernel, args, kwargs) of every launch the families' launchers make on meta tensors."""
    launches = []

    class RecordingLauncher:
        """Stands in for ``torch.library.wrap_triton``: ``RecordingLauncher(kernel)[grid](*args, **kw)``."""

        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    def t(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    for family in families:
        kernels = importlib.import_module(family.kernels)
        kernels.wrap_triton = RecordingLauncher
        # the function under each twin's triton_op (the op itself would dispatch, not launch)
        ops = SimpleNamespace(**{op: getattr(kernels, twin)._init_fn for op, twin in zip(family.ops, family.triton_ops)})
        importlib.import_module(family.cases).triton_launches(ops, t)
    return launches


def signature_of(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) of one recorded launch, as ASTSource wants them."""
    signature, constexprs = {}, {}
    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: no Triton type for {param.name}={value!r}")
    return signature, constexprs, {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}


def compile_variant(kernel, signature: dict, constexprs: dict, options: dict, target: GPUTarget) -> tuple[Usage, int]:
    """Compiles one variant for ``target``; (its resource usage, threads per block). The shared memory
    counts what the cubin declares and what Triton requests at launch."""
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target,
                              options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        (usage,) = resource_usage(cubin.name, arch=target.arch)
    return dataclasses.replace(usage, shared=usage.shared + compiled.metadata.shared), 32 * compiled.metadata.num_warps


def main(argv: list[str]) -> int:
    families = [registry.family(name) for name in argv] if argv else registry.FAMILIES
    variants = {}
    for kernel, args, kwargs in record_launches(families):
        signature, constexprs, options = signature_of(kernel, args, kwargs)
        key = (kernel.__name__, tuple(signature.items()), tuple(constexprs.items()), tuple(options.items()))
        variants.setdefault(key, (kernel, signature, constexprs, options))
    failures = over_limit = 0
    local = []
    for (name, _, constexpr_items, option_items), (kernel, signature, constexprs, options) in variants.items():
        for target in TARGETS + ARCH_SENSITIVE.get(name, []):
            label = f"{name} {dict(constexpr_items)} {dict(option_items) or ''}"
            try:
                usage, threads = compile_variant(kernel, signature, constexprs, options, target)
            except Exception as exc:  # report every variant, not only the first failure
                failures += 1
                print(f"FAIL sm_{target.arch} {label}", "\n    ",
                      f"{type(exc).__name__}: {exc}"[:2000].replace("\n", "\n     "))
                continue
            over_limit += report([usage], threads, label)
            if usage.uses_local_memory:
                local.append(f"sm_{target.arch} {label}")
    print(f"{len(variants)} kernel variants compiled, {failures} compiles failed, {over_limit} above a device limit, "
          f"{len(local)} using local memory (register spills)" + "".join(f"\n    {v}" for v in local))
    return 1 if failures or over_limit else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
