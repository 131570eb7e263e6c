"""Compiles every Triton kernel variant pyvae's launchers ask for, for NVIDIA GPUs, on a machine
without one (run by tests/test_triton_gpu_compile.py in a process of its own).

Triton's interpreter, which runs the kernels in the CPU test suite, accepts code that a GPU
compile rejects (a tl.dot block under 16, operand dtypes that differ, ...). Here the launchers run
on meta tensors with ``wrap_triton`` replaced by a recorder, so each launch gives the kernel, its
argument types and its constexprs exactly as a GPU run would; each distinct variant is then
compiled ahead of time (Triton's own ptxas) for sm_90, and the search for sm_80 too. Prints one
line per variant; exits 1 if any fails.
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before Triton is imported: compile, don't interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pyvae._constants import LikelihoodFlag as flag  # noqa: E402
from pyvae.kernels import likelihood, reparam_kl, vq  # noqa: E402

# Every variant for Hopper; the search (the one kernel whose code generation differs by
# architecture: mma on sm_80, wgmma on sm_90) for Ampere too.
TARGETS = [GPUTarget("cuda", 90, 32)]
ARCH_SENSITIVE = {"_nearest_code_kernel": [GPUTarget("cuda", 80, 32)]}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                torch.int32: "i32"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")

launches: list[tuple[object, tuple, dict]] = []


class RecordingLauncher:
    """Stands in for ``torch.library.wrap_triton``: ``RecordingLauncher(kernel)[grid](*args, **kw)``."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))


def run_launchers() -> None:
    """Every launcher, over the dtypes and the switches that select a kernel variant."""
    meta = torch.device("meta")

    def t(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device=meta)

    fn = {op: getattr(mod, op)._init_fn for mod, op in (
        (reparam_kl, "reparam_kl_forward_triton"), (reparam_kl, "reparam_kl_backward_triton"),
        (likelihood, "likelihood_forward_triton"), (likelihood, "scale_grad_triton_"),
        (vq, "nearest_code_triton"), (vq, "codebook_stats_triton"))}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for cols in (1024, 7, 100000):  # whole short rows per program, ragged, rows longer than a block
            mu = t(64, cols, dtype=dtype)
            for seed in (None, 5):
                fn["reparam_kl_forward_triton"](mu, mu, seed, 2, False)
            fn["reparam_kl_forward_triton"](mu, mu, 5, 1, True)
            seed = t((), dtype=torch.int64)
            for grad_z, grad_kl in ((t(2, 64, cols, dtype=dtype), t(64, cols)), (t(1, 64, cols, dtype=dtype), None),
                                    (None, t(64, cols))):
                fn["reparam_kl_backward_triton"](mu, mu, seed, grad_z, grad_kl)
            # a Gaussian prior: full, one row for the batch ([Z]: stride 0), one value per row
            # ([B, 1]: column stride 0), or either tensor alone
            for prior_mu, prior_logvar in ((mu, t(cols, dtype=dtype)), (t(64, 1, dtype=dtype), None), (None, mu)):
                fn["reparam_kl_forward_triton"](mu, mu, 5, 2, False, prior_mu, prior_logvar)
                fn["reparam_kl_forward_triton"](mu, mu, None, 1, True, prior_mu, prior_logvar)
                for grad_z in (t(1, 64, cols, dtype=dtype), None):
                    fn["reparam_kl_backward_triton"](mu, mu, seed, grad_z, t(64, cols), prior_mu, prior_logvar,
                                                     prior_mu is not None, prior_logvar is not None)
        for loss in ("bernoulli", "gaussian", "continuous_bernoulli"):
            for cols in (3 * 32 * 32, 65537):
                pred, target = t(40, cols, dtype=dtype), t(40, cols)
                logvars = [None] if loss != "gaussian" else [None, t(1, cols), t(40, cols)]
                for logvar in logvars:
                    grads = flag.GRAD_PRED | flag.GRAD_TARGET | (flag.GRAD_LOGVAR if logvar is not None else 0)
                    for mode in (flag.GROUP_LOGVAR_GRAD, 0, flag.PER_ELEMENT):
                        fn["likelihood_forward_triton"](loss, pred, target, logvar, 0.0, 0.0, mode | grads, 1.0)
        fn["scale_grad_triton_"](t(1000, dtype=dtype), t(1))
        for e_dtype in (dtype, torch.float32):
            for dim in (64, 37, 3, 1000):
                for exact in (True, False):
                    fn["nearest_code_triton"](t(300, dim, dtype=dtype), t(500, dim, dtype=e_dtype), exact)
        for dim in (64, 300):
            fn["codebook_stats_triton"](t(300, dim, dtype=dtype), t(300, dtype=torch.int64), 50)


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


def main() -> int:
    for mod in (likelihood, reparam_kl, vq):
        mod.wrap_triton = RecordingLauncher
    run_launchers()
    variants = {}
    for kernel, args, kwargs in launches:
        signature, constexprs, options = signature_of(kernel, args, kwargs)
        key = (kernel.__name__, tuple(signature.items()), tuple(constexprs.items()), tuple(options.items()))
        variants.setdefault(key, (kernel, signature, constexprs, options))
    failures = 0
    for (name, _, constexpr_items, option_items), (kernel, signature, constexprs, options) in variants.items():
        for target in TARGETS + ARCH_SENSITIVE.get(name, []):
            label = f"sm_{target.arch} {name} {dict(constexpr_items)} {dict(option_items) or ''}"
            try:
                triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target,
                               options=options)
                print("ok  ", label)
            except Exception as exc:  # report every variant, not only the first failure
                failures += 1
                print("FAIL", label, "\n    ", f"{type(exc).__name__}: {exc}"[:2000].replace("\n", "\n     "))
    print(f"{len(variants)} kernel variants compiled, {failures} compiles failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
