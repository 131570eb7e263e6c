"""``pyvae.nn.ResidualVQ``: a drop-in for ``vector_quantize_pytorch.ResidualVQ`` (1.32) on pyvae's
fused residual op (:func:`pyvae.residual_quantize`), its stages :class:`pyvae.nn.VectorQuantize`
layers."""
from __future__ import annotations

import inspect
import math
import random

import torch
import torch.distributed as dist
from torch import nn

from ..ops.rvq import residual_quantize, residual_stats
from .vq import rotation_trick
from .vq_compat import UNSUPPORTED_ARGS, VectorQuantize, check_options

__all__ = ["ResidualVQ"]

# vector_quantize_pytorch 1.32.0's ResidualVQ arguments pyvae does not support, with the values that
# mean "off" (as in vq_compat: anything else raises NotImplementedError naming the argument)
_UNSUPPORTED = {
    "diveq": (False,), "heads": (1,), "implicit_neural_codebook": (False,), "beam_size": (None, 1),
    "eval_beam_size": (None, 1), "beam_score_quantizer_weights": (None,), "quant_grad_frac": (0.0,),
    "return_zeros_for_masked_padding": (True,),
}
# the VectorQuantize arguments that ResidualVQ passes on to its stages
_VQ_ARGS = frozenset(inspect.signature(VectorQuantize.__init__).parameters) - {
    "self", "unsupported", "dim", "codebook_size", "codebook_dim", "accept_image_fmap"}


class ResidualVQ(nn.Module):
    """``vector_quantize_pytorch.ResidualVQ`` (version 1.32) on pyvae's fused residual quantisation.

    Arguments (keyword-only, as there): ``dim, num_quantizers, codebook_size`` (an int, or a tuple of
    sizes per stage), ``codebook_dim`` (with ``project_in`` / ``project_out``), ``shared_codebook``,
    ``quantize_dropout``, ``quantize_dropout_cutoff_index``, ``quantize_dropout_multiple_of``,
    ``accept_image_fmap``, and every :class:`pyvae.nn.VectorQuantize` argument for the stages
    (``decay, eps, commitment_weight, kmeans_init, kmeans_iters, threshold_ema_dead_code,
    use_cosine_sim, rotation_trick`` (default: on when ``dim > 1``), ``channel_last,
    sync_codebook``). Every other argument of vector-quantize-pytorch (``heads != 1, diveq,
    implicit_neural_codebook, beam_size, quant_grad_frac, stochastic_sample_codes``, ...) set to
    anything but its default raises ``NotImplementedError`` naming it; an unknown one ``TypeError``.
    ``forward(x, return_all_codes=False, sample_codebook_temp=None, freeze_codebook=False,
    rand_quantize_dropout_fixed_seed=None)`` returns ``(quantized, indices [..., Q], losses [Q])``
    (and ``all_codes [Q, ..., codebook_dim]`` with ``return_all_codes``); ``mask``, ``indices`` and
    ``beam_size`` raise ``NotImplementedError``; ``sample_codebook_temp`` changes nothing, as there
    without ``stochastic_sample_codes``. Inputs ``[B, N, dim]`` (``[B, dim, N]`` with
    ``channel_last=False``), ``[B, dim]`` or ``[B, dim, H, W]`` with ``accept_image_fmap`` (indices
    ``[B, H, W, Q]``).

    The modules are vector-quantize-pytorch's (``project_in``, ``project_out``, ``layers.{q}``, each a
    :class:`pyvae.nn.VectorQuantize`, ``shared_codebook`` sharing the first one's ``_codebook``), so
    the state_dicts have the same keys and load both ways, and for one seed the initial state is the
    one vector-quantize-pytorch draws.

    What is fused: with L2 stages of one codebook size (the default), one call of
    :func:`pyvae.residual_quantize` searches every active stage (no ``[N, K]`` distance matrix, no
    residual per stage in memory); the training step's EMA statistics of every stage come from
    :func:`pyvae.residual_stats`, then each stage's layer applies them as the single-codebook layer
    does (decay, eps, Laplace smoothing, DDP all_reduce, dead-code restarts from that stage's
    residual rows, recomputed one stage at a time; usage buffers). Gradients are vector-quantize-
    pytorch's: without the rotation trick each stage passes its gradient straight through to its
    residual, so ``d quantized / dx = Q_active * I`` (added to the fused op's straight-through);
    with it (the default), through each stage's rotation of its residual, recomputed from x and the
    codes after the search: autograd then keeps, per active stage, that residual and the rotation's
    vectors (a few ``[N, codebook_dim]`` float32 tensors per stage, as vector-quantize-pytorch's
    stages keep), the one place where memory grows with Q. The losses are ``commitment_weight *
    mse(r_q, e_q)`` per stage in training (the fused op's commitment losses, with their gradients),
    zeros in eval. Under DDP each stage's statistics are all_reduced as the single-codebook layer's
    (one collective per stage and step; ``sync_codebook=False`` turns it off), and the quantize
    dropout seed is summed over the processes, as there. ``kmeans_init``: on the first forward the
    stages are initialised in turn, stage q on the residuals the initialised stages before it leave,
    as there. ``use_cosine_sim`` (each stage normalises
    its residual) and codebooks of different sizes are not one L2 search over a stacked codebook:
    they run the stages one after another (each a fused single-codebook search), with the same
    results.

    Differences from vector-quantize-pytorch: the stages' differences from it as
    :class:`pyvae.nn.VectorQuantize` documents them (rows of dead-code restarts and of k-means seeds
    picked by a deterministic hash, empty k-means clusters keep their centroid, near-ties at float32
    rounding); with ``shared_codebook`` dead codes are restarted after each stage's EMA step from
    that stage's residuals (there, also once more from all stages' residuals after the last), and
    ``freeze_codebook`` restarts nothing; the rotation trick's output is the codes exactly (there,
    within rounding); with ``accept_image_fmap`` or ``channel_last=False`` the projections act on the
    channel dimension and any ``H, W`` / ``N`` is accepted (vector-quantize-pytorch 1.32 projects the
    last dimension and fails unless ``C == H == W`` / ``dim == N``); losses in eval mode carry no
    autograd graph; fewer indices than stages without quantize dropout, in
    :meth:`get_codes_from_indices`, raise ValueError (there an assertion).
    """

    def __init__(self, *, dim: int, num_quantizers: int | None = None, codebook_size: int | tuple[int, ...],
                 codebook_dim: int | None = None, shared_codebook: bool = False, quantize_dropout: bool = False,
                 quantize_dropout_cutoff_index: int = 0, quantize_dropout_multiple_of: int = 1,
                 accept_image_fmap: bool = False, mlp_kwargs: dict | None = None, **options) -> None:
        super().__init__()
        vq_kwargs = check_options("ResidualVQ", options, {**UNSUPPORTED_ARGS, **_UNSUPPORTED}, _VQ_ARGS)
        if mlp_kwargs:
            raise NotImplementedError("ResidualVQ: mlp_kwargs (of implicit_neural_codebook) is not supported by pyvae")
        sizes = codebook_size if isinstance(codebook_size, tuple) else None
        if sizes is None and (isinstance(num_quantizers, bool) or not isinstance(num_quantizers, int)
                              or num_quantizers < 1):
            raise ValueError(f"num_quantizers must be a positive int (or codebook_size a tuple of sizes), "
                             f"got {num_quantizers!r}")
        sizes = sizes if sizes is not None else (codebook_size,) * num_quantizers
        if num_quantizers is not None and len(sizes) != num_quantizers:
            raise ValueError(f"codebook_size has {len(sizes)} sizes for num_quantizers = {num_quantizers}")
        if not sizes:
            raise ValueError("codebook_size must have at least one size")
        for name, value, low in (("quantize_dropout_cutoff_index", quantize_dropout_cutoff_index, 0),
                                 ("quantize_dropout_multiple_of", quantize_dropout_multiple_of, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.dim, self.codebook_dim = dim, codebook_dim
        # the same modules, in the same order, as vector-quantize-pytorch: one seed, one initial state
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.accept_image_fmap = accept_image_fmap
        self.return_zeros_for_masked_padding = True
        self.implicit_neural_codebook = self.diveq = False
        self.num_quantizers = len(sizes)
        self.codebook_sizes = sizes
        self.uniform_codebook_size = len(set(sizes)) == 1
        self.layers = nn.ModuleList([VectorQuantize(dim=codebook_dim, codebook_size=size, codebook_dim=codebook_dim,
                                                    accept_image_fmap=accept_image_fmap, **vq_kwargs)
                                     for size in sizes])
        self.quantize_dropout = bool(quantize_dropout) and self.num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.vq_is_ema_updating = True
        self.quant_grad_frac = 0.0
        self.beam_size = self.eval_beam_size = None
        self.mlps = (None,) * (self.num_quantizers - 1)
        self.shared_codebook = shared_codebook
        self.channel_last = self.layers[0].channel_last
        if shared_codebook:
            if not self.uniform_codebook_size:
                raise ValueError("shared_codebook needs one codebook size for every stage")
            for layer in self.layers[1:]:
                layer._codebook = self.layers[0]._codebook

    # ------------------------------------------------------------------ vector-quantize-pytorch's API
    @property
    def codebook_size(self):
        return self.layers[0].codebook_size

    @property
    def codebooks(self):
        codebooks = tuple(layer.codebook for layer in self.layers)
        return torch.stack(codebooks) if self.uniform_codebook_size else codebooks

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``[Q, B, ..., codebook_dim]``: each stage's codes of ``indices [B, ..., q]`` (q <= Q; the
        missing stages and indices -1, as quantize dropout leaves them, give zeros)."""
        stages = indices.shape[-1]
        if stages < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError(f"indices have {stages} stages of {self.num_quantizers}: fewer need quantize_dropout")
            indices = torch.nn.functional.pad(indices, (0, self.num_quantizers - stages), value=-1)
        dropped = indices == -1
        indices = indices.masked_fill(dropped, 0)
        codes = torch.stack([layer.codebook[indices[..., q]] for q, layer in enumerate(self.layers)])
        return codes.masked_fill(dropped.movedim(-1, 0).unsqueeze(-1), 0.0)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.get_codes_from_indices(indices).sum(0))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, mask=None, indices=None, return_all_codes: bool = False,
                sample_codebook_temp=None, freeze_codebook: bool = False, rand_quantize_dropout_fixed_seed=None,
                beam_size=None):
        for name, value in (("mask", mask), ("indices", indices), ("beam_size", beam_size)):
            if value is not None and not (name == "beam_size" and value == 1):
                raise NotImplementedError(f"ResidualVQ.forward: {name} is not supported by pyvae")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        expected = (4,) if self.accept_image_fmap else (2, 3)
        if x.dim() not in expected:
            raise ValueError(f"x must be {'[B, dim, H, W]' if self.accept_image_fmap else '[B, N, dim] or [B, dim]'}, "
                             f"got shape {tuple(x.shape)}")
        channels_first = x.dim() > 2 and (self.accept_image_fmap or not self.channel_last)
        h = x.flatten(2).transpose(1, 2) if channels_first else x
        if h.shape[-1] != self.dim:
            raise ValueError(f"x has {h.shape[-1]} features where dim = {self.dim} was expected "
                             f"(shape {tuple(x.shape)})")
        h = self.project_in(h)
        active = self._active_stages(x.device, rand_quantize_dropout_fixed_seed)
        self._init_stages(h, active)
        fused = self.uniform_codebook_size and not self.layers[0].use_cosine_sim
        quantized, idx, losses = (self._fused if fused else self._stage_by_stage)(h, active, bool(freeze_codebook))
        if active < self.num_quantizers:
            idx = torch.nn.functional.pad(idx, (0, self.num_quantizers - active), value=-1)
            losses = torch.nn.functional.pad(losses, (0, self.num_quantizers - active))
        quantized = self.project_out(quantized)
        if channels_first:
            quantized = quantized.transpose(1, 2).reshape(x.shape[0], -1, *x.shape[2:])
            idx = idx.reshape(*x.shape[:1], *x.shape[2:], self.num_quantizers)
        if not return_all_codes:
            return quantized, idx, losses
        return quantized, idx, losses, self.get_codes_from_indices(idx)

    def _active_stages(self, device, seed) -> int:
        """The stages this forward runs: all, or with quantize dropout in training those up to an
        index drawn as vector-quantize-pytorch draws it (python's random.Random(seed), the seed one
        torch.randint below 10000, summed over the processes under DDP), for one torch seed the same."""
        if not (self.training and self.quantize_dropout):
            return self.num_quantizers
        if seed is None:
            seed = torch.randint(0, 10_000, (), device=device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(seed)
            seed = seed.item()
        index = random.Random(seed).randrange(self.quantize_dropout_cutoff_index, self.num_quantizers)
        multiple = self.quantize_dropout_multiple_of
        if multiple != 1:
            index = math.ceil((index + 1) / multiple) * multiple - 1
        return min(index + 1, self.num_quantizers)

    @torch.no_grad()
    def _init_stages(self, h: torch.Tensor, active: int) -> None:
        """k-means initialisation of the stages not yet initialised (on any first forward, as there):
        stage q on the residual r_q of the stages before it, once those are initialised."""
        vqs = [layer._codebook for layer in self.layers[:active]]
        if all(vq._initted for vq in vqs):
            return
        r = h.detach().reshape(-1, self.codebook_dim)
        for q, vq in enumerate(vqs):
            if not vq._initted:
                vq.init_codebook(r)
            if q + 1 < active:
                _, result = vq._quantize(r, vq.codebook)
                r = r - result.quantized

    def _fused(self, h: torch.Tensor, active: int, freeze: bool):
        """Every active stage in one fused search (L2 stages of one size)."""
        vqs = [layer._codebook for layer in self.layers[:active]]
        first = vqs[0]
        if self.shared_codebook:
            codebooks = first._snapshot().expand(active, *first.codebook.shape)
        else:
            codebooks = torch.stack([vq._snapshot() for vq in vqs])
        result = residual_quantize(h, codebooks, precision=first.precision, backend=first.backend)
        idx = result.indices
        if not self.training:
            # vector-quantize-pytorch: no gradient to the input and no loss in eval mode
            return result.quantized.detach(), idx, h.new_zeros(active, dtype=torch.float32)
        quantized = result.quantized
        if h.requires_grad and torch.is_grad_enabled():
            if self.layers[0].rotation_trick:
                # each stage's output is rotate_to(r_q, e_q): its value the code (a sum of exact
                # zeros is added), its gradient through the rotation of the residual r_q
                flat_idx = idx.reshape(-1, active)
                r = h.reshape(-1, self.codebook_dim)
                extra = 0
                for q in range(active):
                    codes = codebooks[q].index_select(0, flat_idx[:, q])
                    extra = extra + (rotation_trick(r, codes) - codes)
                    r = r - codes
                quantized = quantized.detach() + extra.reshape(h.shape)
            else:
                # each stage passes its gradient straight through to r_q = x - (constants)
                quantized = quantized + (active - 1) * (h - h.detach())
        losses = result.commitment_losses.float() * first.beta
        if not freeze:
            self._ema_steps(vqs, h.detach().reshape(-1, self.codebook_dim), codebooks, idx.reshape(-1, active))
        elif self.shared_codebook:
            self._recompute_shared()
        return quantized, idx, losses

    @torch.no_grad()
    def _ema_steps(self, vqs, rows: torch.Tensor, codebooks: torch.Tensor, idx: torch.Tensor) -> None:
        """Each stage's EMA step from the per-stage statistics (a shared codebook takes them in
        stage order, as vector-quantize-pytorch), and its usage buffers."""
        counts, sums = residual_stats(rows, codebooks, idx, backend=vqs[0].backend)
        restarts = vqs[0].dead_code_threshold > 0
        r = rows if restarts else None  # the rows of restarts: one stage's residuals at a time
        for q, vq in enumerate(vqs):
            vq._track_usage(vq._ema_update(r, None, stats=(counts[q], sums[q])))
            if restarts and q + 1 < len(vqs):
                r = r - codebooks[q].to(r.dtype).index_select(0, idx[:, q])

    @torch.no_grad()
    def _recompute_shared(self) -> None:
        """vector-quantize-pytorch recomputes a shared codebook from its EMA statistics after every
        training forward, frozen or not."""
        vq = self.layers[0]._codebook
        vq.codebook.copy_(vq._ema_codebook())

    def _stage_by_stage(self, h: torch.Tensor, active: int, freeze: bool):
        """The stages one after another (cosine stages, or codebooks of different sizes): each a
        fused single-codebook search of its residual; a shared codebook is searched as it was before
        the step at every stage."""
        vqs = [layer._codebook for layer in self.layers[:active]]
        shared = vqs[0]._snapshot() if self.shared_codebook else None
        r, quantized, indices, losses = h, 0, [], []
        for vq in vqs:
            searched, result = vq._quantize(r, shared)
            out = result.quantized
            if self.training:
                if not freeze:
                    vq._learn(searched, result)
                losses.append(vq.beta * result.commitment_loss.float())
            else:
                out = out.detach()
                losses.append(h.new_zeros((), dtype=torch.float32))
            indices.append(result.indices)
            r = r - out.detach()
            quantized = quantized + out
        if self.training and freeze and self.shared_codebook:
            self._recompute_shared()
        return quantized, torch.stack(indices, -1), torch.stack(losses)

    def extra_repr(self) -> str:
        return (f"num_quantizers={self.num_quantizers}, codebook_sizes={self.codebook_sizes}, "
                f"codebook_dim={self.codebook_dim}, shared_codebook={self.shared_codebook}, "
                f"quantize_dropout={self.quantize_dropout}")
