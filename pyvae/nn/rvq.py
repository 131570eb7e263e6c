"""ResidualVectorQuantizer: Q codebooks in sequence (residual VQ: SoundStream, EnCodec, RQ-VAE) on
pyvae's fused residual op, each stage's codebook learned or updated by EMA as a
:class:`pyvae.nn.VectorQuantizer`'s."""
from __future__ import annotations

import torch
from torch import nn

from .. import backends
from ..ops import check_floating
from ..ops.rvq import ResidualVQResult, residual_quantize
from ..ops.vq import codebook_snapshot, nearest_code
from .vq import VectorQuantizer


class ResidualVectorQuantizer(nn.Module):
    """Quantise the last dimension of its input with ``num_quantizers`` codebooks of ``num_codes``
    codes in sequence: stage q quantises what stages 0..q-1 left (:func:`pyvae.residual_quantize`,
    all stages in one fused call; the residual is never written to memory in forward).

    Each stage is a :class:`pyvae.nn.VectorQuantizer` (``stages[q]``), which holds its codebook,
    EMA statistics, ``usage`` and ``perplexity`` buffers and options: ``beta``, ``ema_decay``
    (None: codebooks trained by the codebook losses), ``eps``, ``dead_code_threshold``,
    ``kmeans_init``, ``kmeans_iters``, ``usage_decay``, ``sync_ema``, ``precision`` and ``backend``
    mean what they mean there, per stage, with stage q's statistics, restarts and k-means taken on
    its residuals ``r_q`` (recomputed one stage at a time after the fused search; but see shared_codebook).
    ``forward`` returns a :class:`pyvae.ops.ResidualVQResult` whose ``loss`` is the stages' summed
    ``codebook + beta * commitment`` losses (learned), or ``beta`` times the summed commitment losses
    (EMA). The quantized vector's gradient passes straight through to x once (not once per stage).

    ``shared_codebook=True``: one codebook (``stages[0]``'s) serves every stage; its one EMA step
    takes every stage's residuals together (held at once, ``[N * Q, D]``, for that step only). Cosine similarity and the rotation trick have no fused form here
    (vector-quantize-pytorch's ``ResidualVQ`` drop-in, :class:`pyvae.nn.ResidualVQ`, has them).
    """

    def __init__(self, num_codes: int, dim: int, num_quantizers: int, *, beta: float = 0.25,
                 ema_decay: float | None = None, eps: float = 1e-5, precision: str = "exact", backend: str = "auto",
                 sync_ema: bool = True, dead_code_threshold: float = 0.0, kmeans_init: bool = False,
                 kmeans_iters: int = 10, usage_decay: float = 0.99, shared_codebook: bool = False) -> None:
        super().__init__()
        if isinstance(num_quantizers, bool) or not isinstance(num_quantizers, int) or num_quantizers < 1:
            raise ValueError(f"num_quantizers must be an int >= 1, got {num_quantizers!r}")
        if not isinstance(shared_codebook, bool):
            raise TypeError(f"shared_codebook must be a bool, got {shared_codebook!r}")
        self.num_quantizers, self.shared_codebook = num_quantizers, shared_codebook
        self.stages = nn.ModuleList(
            VectorQuantizer(num_codes, dim, beta=beta, ema_decay=ema_decay, eps=eps, precision=precision,
                            backend=backend, sync_ema=sync_ema, dead_code_threshold=dead_code_threshold,
                            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, usage_decay=usage_decay)
            for _ in range(1 if shared_codebook else num_quantizers))
        first = self.stages[0]
        self.num_codes, self.dim, self.beta, self.ema_decay = first.num_codes, first.dim, first.beta, first.ema_decay
        self.precision, self.backend = precision, backend

    def _stage(self, q: int) -> VectorQuantizer:
        return self.stages[0 if self.shared_codebook else q]

    @property
    def codebooks(self) -> torch.Tensor:
        """``[Q, K, D]``: every stage's codebook (a view of one codebook with ``shared_codebook``)."""
        if self.shared_codebook:
            return self.stages[0].codebook.expand(self.num_quantizers, -1, -1)
        return torch.stack([s.codebook for s in self.stages])

    def forward(self, x: torch.Tensor) -> ResidualVQResult:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be a tensor [..., {self.dim}] (dim = {self.dim}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        check_floating("x", x, backends.resolve(self.backend, x.device, "rvq"))
        if self.training and not all(s._initted for s in self.stages):
            self.init_codebooks(x)
        ema_step = self.ema_decay is not None and self.training
        # EMA steps rewrite the codebooks in place after the search: autograd keeps a snapshot of
        # the codes this forward used (VectorQuantizer.forward says why it is an opaque op)
        codebooks = codebook_snapshot(self.codebooks) if ema_step else self.codebooks
        result = residual_quantize(x, codebooks, beta=self.beta, precision=self.precision, backend=self.backend)
        if self.training:
            self._update_stages(x.detach().reshape(-1, self.dim), result.indices.reshape(-1, self.num_quantizers),
                                codebooks.detach(), result.counts, ema_step)
        if self.ema_decay is not None:
            result = result._replace(loss=self.beta * result.commitment_losses.sum())
        return result

    @torch.no_grad()
    def _update_stages(self, rows: torch.Tensor, idx: torch.Tensor, codebooks: torch.Tensor, counts: torch.Tensor,
                       ema_step: bool) -> None:
        """Each stage's EMA step (on its residuals, recomputed stage by stage from the codes the
        search used) and usage; with a shared codebook, one step on every stage's rows."""
        if not ema_step:
            for q in range(self.num_quantizers):
                self._stage(q)._track_usage(counts[q])
            return
        residuals, r = [], rows.to(codebooks.dtype)
        for q in range(self.num_quantizers):
            if self.shared_codebook:
                residuals.append(r)
            else:
                self.stages[q]._track_usage(self.stages[q]._ema_update(r, idx[:, q]))
            if q + 1 < self.num_quantizers:
                r = r - codebooks[q].index_select(0, idx[:, q])
        if self.shared_codebook:
            shared = self.stages[0]
            shared._track_usage(shared._ema_update(torch.cat(residuals), idx.t().reshape(-1)))

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor) -> None:
        """k-means initialisation of each stage not yet initialised, in order, on its residuals
        (stage q's from the codes of the stages before it, once those are initialised)."""
        r = x.detach().reshape(-1, self.dim)
        for q in range(self.num_quantizers):
            stage = self._stage(q)
            if not stage._initted:
                stage.init_codebook(r)
            codebook = stage.codebook
            idx, _ = nearest_code(r, codebook, precision=self.precision, backend=self.backend)
            r = r - codebook.to(r.dtype).index_select(0, idx)

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``[Q, ..., D]``: each stage's codes of ``indices`` ``[..., Q]``."""
        return torch.stack([nn.functional.embedding(indices[..., q], self._stage(q).codebook)
                            for q in range(self.num_quantizers)])

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``[..., D]``: the quantized vector of ``indices`` ``[..., Q]`` (the stages' codes summed)."""
        return self.get_codes_from_indices(indices).sum(0)

    def extra_repr(self) -> str:
        return (f"num_quantizers={self.num_quantizers}, shared_codebook={self.shared_codebook}, "
                f"backend={self.backend!r}")
