"""Constants that every backend must agree on with the C++ kernels, defined once in C++
(``csrc/common/likelihood_params.h``, ``csrc/common/vq_params.h``) and read from the extension
(``pyvae._C.shared_constants()``); the Triton kernels get them as ``tl.constexpr`` arguments.

:data:`FALLBACK` is the one copy in Python, for a pyvae installed without its extension (the torch
and triton backends then run alone); ``tests/test_backends.py`` fails if it differs from the
extension's. This module sits beside ``pyvae._C``, not in ``pyvae.kernels``: ``pyvae.ops`` composes
the likelihood op's flags for every backend, and ``pyvae.kernels`` holds the Triton side.
"""
from __future__ import annotations

import importlib

FALLBACK = {
    "likelihood_column_block": 16384,  # kLikelihoodColumnBlock
    "logvar_group_rows": 16,           # kLogvarGroupRows
    "stats_chunk_rows": 64,            # kStatsChunkRows
    "likelihood_flags": {"per_element": 1, "grad_pred": 2, "grad_target": 4, "grad_logvar": 8,
                         "group_logvar_grad": 16},  # namespace likelihood_flags
}


def _shared_constants() -> dict:
    try:
        extension = importlib.import_module("pyvae._C")
    except (ImportError, OSError):  # not built, or broken (pyvae.backends warns about that)
        return FALLBACK
    return extension.shared_constants()


SHARED = _shared_constants()

# Columns per block of a likelihood row: the per-sample sums add the blocks' partial sums in order.
LIKELIHOOD_COLUMN_BLOCK: int = SHARED["likelihood_column_block"]
# Rows per group of a batch-shared log-variance's gradient, as the likelihood op returns it.
LOGVAR_GROUP_ROWS: int = SHARED["logvar_group_rows"]
# Rows of one code summed together by the GPU codebook_stats before the chunk sums are added in order.
STATS_CHUNK_ROWS: int = SHARED["stats_chunk_rows"]


class LikelihoodFlag:
    """The bits of the likelihood op's ``flags`` argument (``torch.ops.pyvae.likelihood_forward``):
    what its one pass returns besides the per-sample losses."""

    PER_ELEMENT: int = SHARED["likelihood_flags"]["per_element"]  # losses per element, not per sample
    GRAD_PRED: int = SHARED["likelihood_flags"]["grad_pred"]      # derivatives w.r.t. the prediction,
    GRAD_TARGET: int = SHARED["likelihood_flags"]["grad_target"]  # the target,
    GRAD_LOGVAR: int = SHARED["likelihood_flags"]["grad_logvar"]  # the log-variance (needs one)
    # a batch-shared log-variance's derivatives summed over groups of LOGVAR_GROUP_ROWS rows
    GROUP_LOGVAR_GRAD: int = SHARED["likelihood_flags"]["group_logvar_grad"]
    ALL: int = PER_ELEMENT | GRAD_PRED | GRAD_TARGET | GRAD_LOGVAR | GROUP_LOGVAR_GRAD
    GRADS: tuple[int, int, int] = (GRAD_PRED, GRAD_TARGET, GRAD_LOGVAR)  # the order of the op's `grads`
