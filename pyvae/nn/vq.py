"""VectorQuantizer layer: a codebook, nearest-code quantisation with a straight-through (or
rotation-trick) gradient, and either learned codes (codebook loss) or exponential-moving-average
updates with dead-code restarts; optional k-means initialisation and cosine similarity."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..ops import check_floating
from ..ops.vq import (PRECISIONS, VQResult, codebook_stats_of_search, codebook_snapshot, nearest_code,
                      perplexity_of_frequencies, vector_quantize)

# torch 2.13 renames all_gather_into_tensor (deprecated there) to all_gather_single; older torch
# (2.11 on the GPU machines) has only the former.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_STRAIGHT_THROUGH = ("identity", "rotation")
_NORM_EPS = 1e-6      # L2 normalisation and the rotation trick's divisions, as vector-quantize-pytorch
_M32 = 0xFFFFFFFF
_KEY_HI = 1 << 16     # row keys travel as two float32 halves of 16 bits (exact); a high half of 2^16 pads
_SIZE_LO = 1 << 20    # row counts travel as two float32 "digits" of 20 bits (exact below 2^44 rows)


class VectorQuantizer(nn.Module):
    """Quantise the last dimension of its input to the nearest of ``num_codes`` codes.

    ``ema_decay=None``: the codebook is a parameter trained by the codebook loss (VQ-VAE, van den
    Oord et al. 2017). ``ema_decay=0.99`` (say): the codebook is a buffer updated in training mode
    from deterministic per-code counts and sums (:func:`pyvae.codebook_stats`) with Laplace
    smoothing, starting from one pseudo-observation per code at its initial position (so unused
    codes stay put), and the returned loss is ``beta * commitment_loss`` only. ``forward`` returns a
    :class:`pyvae.ops.VQResult`; ``state_dict`` holds the codebook (and the EMA statistics).

    Options:

    ``dead_code_threshold`` (EMA mode only; 0 = off): after each training step's EMA update, a
    code whose EMA count is below the threshold is restarted at a row of the current batch, and its
    statistics are reset to ``threshold`` pseudo-observations at that row (count = threshold,
    sum = threshold * row, as vector-quantize-pytorch does; so it is not dead again at once if it
    is used). The rows are distinct rows of the batch, chosen without host randomness: the rows
    with the smallest hash keys of (step counter, global row index), dead codes taking them in
    code order; with more dead codes than rows, the rest wait for a later step. The learned
    codebook (``ema_decay=None``) has no counts to judge by: the option raises ValueError there.

    ``kmeans_init``: the first training batch initialises the codebook by ``kmeans_iters`` Lloyd
    iterations (assignments by :func:`pyvae.nearest_code`, centroids from the op's per-code
    statistics), starting from distinct batch rows chosen as above; an empty cluster keeps its
    centroid; codes beyond the batch's row count keep their initial values. In EMA mode the EMA
    counts become the final clusters' sizes (at least one pseudo-observation) and the sums
    ``count * centroid``. The ``initted`` buffer records that this happened, so a loaded
    state_dict is not initialised again (:meth:`init_codebook` runs it by hand).

    ``cosine``: inputs and codes are L2-normalised; search, losses, EMA statistics and restarts
    live on the unit sphere, and the EMA codebook is normalised again after each update.

    ``straight_through``: ``"identity"`` passes the gradient of ``quantized`` to x unchanged;
    ``"rotation"`` is the rotation trick (Fifty et al. 2024): ``quantized`` still has the value of
    the codes, and x gets the gradient through the rotation and rescaling that map x onto its code
    (treated as constants), as ``vector_quantize_pytorch.rotate_to`` computes it.

    Buffers ``usage`` ([K], the fraction of a batch's rows each code took) and ``perplexity``
    (scalar, exp of the entropy of those fractions) are exponential moving averages over training
    batches with decay ``usage_decay``; the first batches are plain averages (weight ``1/(t+1)``
    at step t until that falls to ``1 - usage_decay``), so they carry no start-up bias. Monitoring
    only: they and the step counter ``steps`` are left out of the state_dict (which keeps the
    layer's keys as before), so a layer restored from a state_dict starts them afresh. ``steps``
    also salts the rows that restarts and k-means pick, so exact resumption needs it: ``pyvae
    train``'s checkpoints save every buffer a model's state_dict leaves out beside it.

    Under data parallelism (``torch.distributed`` initialised, more than one process) the EMA
    counts and sums, the k-means statistics and the rows of restarts are exchanged between the
    processes (one ``all_reduce`` per step, plus one ``all_gather`` with dead-code restarts), so
    every replica keeps the same codebook, the one a single process would compute from the
    concatenated batch (rank 0's rows first); ``sync_ema=False`` turns that off. In learned mode
    ``usage``/``perplexity`` count the local batch. ``forward`` never reads a value back to the host.
    """

    def __init__(self, num_codes: int, dim: int, *, beta: float = 0.25, ema_decay: float | None = None,
                 eps: float = 1e-5, precision: str = "exact", backend: str = "auto", sync_ema: bool = True,
                 dead_code_threshold: float = 0.0, kmeans_init: bool = False, kmeans_iters: int = 10,
                 cosine: bool = False, straight_through: str = "identity", usage_decay: float = 0.99) -> None:
        super().__init__()
        _check_int("num_codes", num_codes, 1)
        _check_int("dim", dim, 1)
        _check_int("kmeans_iters", kmeans_iters, 0)
        if not (isinstance(beta, (int, float)) and beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if ema_decay is not None and not (isinstance(ema_decay, (int, float)) and 0 <= ema_decay < 1):
            raise ValueError(f"ema_decay must be None (learned codebook) or a number in [0, 1), got {ema_decay!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
        if not (isinstance(dead_code_threshold, (int, float)) and 0 <= dead_code_threshold < math.inf):
            raise ValueError(f"dead_code_threshold must be a finite number >= 0 (0 = off), got {dead_code_threshold!r}")
        if dead_code_threshold > 0 and ema_decay is None:
            raise ValueError("dead_code_threshold needs EMA counts to judge codes by: set ema_decay "
                             "(e.g. 0.99) or leave dead_code_threshold=0 for the learned codebook")
        if straight_through not in _STRAIGHT_THROUGH:
            raise ValueError(f"straight_through must be 'identity' or 'rotation', got {straight_through!r}")
        if not (isinstance(usage_decay, (int, float)) and 0 <= usage_decay < 1):
            raise ValueError(f"usage_decay must be a number in [0, 1), got {usage_decay!r}")
        for name, flag in (("kmeans_init", kmeans_init), ("cosine", cosine), ("sync_ema", sync_ema)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        self.num_codes, self.dim, self.beta, self.ema_decay, self.eps = num_codes, dim, beta, ema_decay, eps
        self.precision, self.backend, self.sync_ema = precision, backend, sync_ema
        self.dead_code_threshold, self.kmeans_init, self.kmeans_iters = float(dead_code_threshold), kmeans_init, kmeans_iters
        self.cosine, self.straight_through, self.usage_decay = cosine, straight_through, usage_decay
        init = torch.randn(num_codes, dim) / dim ** 0.5
        if cosine:
            init = F.normalize(init, dim=-1, eps=_NORM_EPS)
        if ema_decay is None:
            self.codebook = nn.Parameter(init)
        else:
            # The EMA starts as if each code had one observation at its initial position: a code
            # unused so far stays where it is (ema_sums / ema_counts), instead of being divided by
            # the smoothing eps and thrown ~1/eps away, as zero initial counts would do.
            self.register_buffer("codebook", init)
            self.register_buffer("ema_counts", torch.ones(num_codes))
            self.register_buffer("ema_sums", init.clone())
        # persistent only where it means something, so the default layers keep their state_dict keys
        self.register_buffer("initted", torch.tensor(not kmeans_init), persistent=kmeans_init)
        self.register_buffer("usage", torch.zeros(num_codes), persistent=False)
        self.register_buffer("perplexity", torch.zeros(()), persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64), persistent=False)
        # the host's copy of `initted`, so forward never reads the buffer (refreshed on load)
        self._initted = not kmeans_init
        self.register_load_state_dict_post_hook(_refresh_initted)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x) -> None:
        """What the ops would refuse, refused before k-means or the EMA step writes a buffer."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be a tensor [..., {self.dim}] (dim = {self.dim}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        check_floating("x", x, backends.resolve(self.backend, x.device, "vq"))

    def forward(self, x: torch.Tensor) -> VQResult:
        self._check_input(x)
        if self.training and not self._initted:
            self.init_codebook(x)
        x, result = self._quantize(x)
        if self.training:
            self._learn(x, result)
        if self.ema_decay is None:
            return result
        return result._replace(loss=self.beta * result.commitment_loss)

    def _snapshot(self) -> torch.Tensor:
        """The codebook a training step quantises with: in EMA mode a copy, since the EMA step
        rewrites the buffer in place while autograd keeps the codes the forward used (for the
        commitment and rotation gradients); K x D, small next to the search. An opaque op, not
        clone(): torch.compile (2.13) would otherwise recompute the codes in backward from the
        buffer, after the update (wrong gradients)."""
        if self.ema_decay is not None and self.training:
            return codebook_snapshot(self.codebook)
        return self.codebook

    def _quantize(self, x: torch.Tensor, codebook: torch.Tensor | None = None) -> tuple[torch.Tensor, VQResult]:
        """(x as searched (normalised with ``cosine``), the search's result with the straight-through
        of the layer) against ``codebook`` (default :meth:`_snapshot`); writes nothing."""
        x = self._normalize(x)
        codebook = self._normalize(self._snapshot() if codebook is None else codebook)
        result = vector_quantize(x, codebook, beta=self.beta, precision=self.precision, backend=self.backend)
        if self.straight_through == "rotation" and x.requires_grad and torch.is_grad_enabled():
            result = result._replace(quantized=rotation_trick(x, result.quantized.detach()))
        return x, result

    def _learn(self, x: torch.Tensor, result: VQResult) -> None:
        """A training step's updates from :meth:`_quantize`'s rows and result: the EMA step (EMA
        mode) and the usage buffers."""
        if self.ema_decay is not None:
            counts = self._ema_update(x.detach().reshape(-1, self.dim), result.indices.reshape(-1))
        else:
            counts = result.counts
        self._track_usage(counts)

    def _normalize(self, t: torch.Tensor) -> torch.Tensor:
        return F.normalize(t, dim=-1, eps=_NORM_EPS) if self.cosine else t

    def _world(self) -> tuple[int, int]:
        """(world size, rank) of the processes that share the codebook statistics; (1, 0) alone."""
        if self.sync_ema and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    @torch.no_grad()
    def _ema_update(self, x: torch.Tensor | None, indices: torch.Tensor | None,
                    stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One EMA step (and dead-code restarts) from rows x [N, D] and their codes; returns the
        (global) counts. ``stats``: this process's (counts [K], sums [K, D]) of those rows when
        the caller has them already (``pyvae.residual_stats``); x is then read only by restarts."""
        k, d = self.num_codes, self.dim
        restarts = self.dead_code_threshold > 0
        if stats is None:
            counts, sums = codebook_stats_of_search(x, indices, k, backend=self.backend)
        else:
            counts, sums = stats
            if restarts and x is None:
                raise ValueError("dead-code restarts need the rows x")
        world, rank = self._world()
        sizes = None
        if world > 1:
            parts = [counts, sums.flatten()]
            if restarts:  # every rank's row count, for global row indices: in the same collective
                parts.append(_one_hot_size(x.shape[0], world, rank, counts))
            stats = torch.cat(parts)
            dist.all_reduce(stats)
            counts, sums = stats[:k], stats[k:k + k * d].view(k, d)
            if restarts:
                digits = stats[k + k * d:].view(world, 2).to(torch.int64)
                sizes = digits[:, 0] * _SIZE_LO + digits[:, 1]
        decay = self.ema_decay
        self.ema_counts.mul_(decay).add_(counts.to(self.ema_counts.dtype), alpha=1 - decay)
        self.ema_sums.mul_(decay).add_(sums.to(self.ema_sums.dtype), alpha=1 - decay)
        codebook = self._ema_codebook()
        if restarts:
            # after the update, as vector-quantize-pytorch: a code is judged by its updated count
            threshold = self.dead_code_threshold
            dead = self.ema_counts < threshold
            rows, restart = _pick_rows(x.to(codebook.dtype), dead, self.steps * 2, world, rank, sizes)
            codebook = torch.where(restart.unsqueeze(1), rows, codebook)
            self.ema_counts.copy_(torch.where(restart, threshold, self.ema_counts))
            self.ema_sums.copy_(torch.where(restart.unsqueeze(1), rows * threshold, self.ema_sums))
        self.codebook.copy_(codebook)
        return counts

    def _ema_codebook(self) -> torch.Tensor:
        """The codebook the EMA statistics give: sums over Laplace-smoothed counts (normalised
        with ``cosine``)."""
        total = self.ema_counts.sum()
        smoothed = (self.ema_counts + self.eps) / (total + self.num_codes * self.eps) * total
        return self._normalize(self.ema_sums / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _track_usage(self, counts: torch.Tensor) -> None:
        fraction = counts.to(self.usage.dtype) / counts.sum().to(self.usage.dtype).clamp_min(1)
        perplexity = perplexity_of_frequencies(fraction)
        weight = (1.0 / (self.steps + 1).to(self.usage.dtype)).clamp_min(1 - self.usage_decay)
        self.usage.lerp_(fraction, weight)
        self.perplexity.lerp_(perplexity, weight)
        self.steps.add_(1)

    # ------------------------------------------------------------------ k-means
    @torch.no_grad()
    def init_codebook(self, x: torch.Tensor) -> None:
        """Initialise the codebook from the rows of x by k-means (``kmeans_iters`` Lloyd
        iterations), identically on every process under data parallelism, and set ``initted``.
        ``forward`` calls it on the first training batch when ``kmeans_init`` is set."""
        self._check_input(x)
        k = self.num_codes
        rows = self._normalize(x.detach().reshape(-1, self.dim).to(self.codebook.dtype))
        world, rank = self._world()
        if world == 1 and rows.shape[0] == 0:
            return  # nothing to learn from: wait for a batch with rows
        sizes = None
        if world > 1:
            sizes = torch.zeros(world, dtype=torch.int64, device=rows.device)
            sizes[rank] = rows.shape[0]
            dist.all_reduce(sizes)
        everything = torch.ones(k, dtype=torch.bool, device=rows.device)
        picked, ok = _pick_rows(rows, everything, self.steps * 2 + 1, world, rank, sizes)
        means = torch.where(ok.unsqueeze(1), picked, self.codebook.detach())
        counts = torch.ones(k, dtype=means.dtype, device=means.device)
        for _ in range(self.kmeans_iters):
            idx, _ = nearest_code(rows, means, precision=self.precision, backend=self.backend)
            counts, sums = codebook_stats_of_search(rows, idx, k, backend=self.backend)
            if world > 1:
                stats = torch.cat([counts.unsqueeze(1), sums], dim=1)
                dist.all_reduce(stats)
                counts, sums = stats[:, 0], stats[:, 1:]
            counts, sums = counts.to(means.dtype), sums.to(means.dtype)
            centroids = self._normalize(sums / counts.clamp_min(1).unsqueeze(1))
            means = torch.where((counts > 0).unsqueeze(1), centroids, means)  # empty: stays put
        self.codebook.copy_(means)
        if self.ema_decay is not None:
            counts = counts.clamp_min(1)
            self.ema_counts.copy_(counts)
            self.ema_sums.copy_(means * counts.unsqueeze(1))
        self.initted.fill_(True)
        self._initted = True

    def extra_repr(self) -> str:
        out = f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}"
        if self.ema_decay is not None:
            out += f", ema_decay={self.ema_decay}"
        if self.dead_code_threshold:
            out += f", dead_code_threshold={self.dead_code_threshold}"
        if self.kmeans_init:
            out += f", kmeans_init=True, kmeans_iters={self.kmeans_iters}"
        if self.cosine:
            out += ", cosine=True"
        if self.straight_through != "identity":
            out += f", straight_through={self.straight_through!r}"
        return out + f", backend={self.backend!r}"


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _refresh_initted(module: VectorQuantizer, incompatible_keys) -> None:
    module._initted = bool(module.initted)  # load time, not forward: reading the buffer is fine here


# ---------------------------------------------------------------------- the rotation trick
def rotation_trick(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024, sec. 4.2): a tensor with the value of ``codes`` whose
    gradient reaches ``x`` through ``s R x``, where R rotates x/|x| onto codes/|codes| and
    s = |codes| / |x|, both treated as constants (the math of ``vector_quantize_pytorch.rotate_to``).
    Computed in float32 (float64 for float64 inputs); ``codes`` get no gradient."""
    cdt = torch.promote_types(x.dtype, torch.float32)
    xf, ef = x.to(cdt), codes.detach().to(cdt)
    x_norm = xf.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    e_norm = ef.norm(dim=-1, keepdim=True)
    u = (xf / x_norm).detach()
    q = ef / e_norm.clamp_min(_NORM_EPS)
    w = F.normalize(u + q, dim=-1, eps=_NORM_EPS)
    # R x = x - 2 (x.w) w + 2 (x.u) q: the Householder reflection about w, then the one that lands on q
    rotated = (xf - 2 * (xf * w).sum(-1, keepdim=True) * w + 2 * (xf * u).sum(-1, keepdim=True) * q) \
        * (e_norm / x_norm).detach()
    rotated = rotated.to(x.dtype)
    return codes.detach() + (rotated - rotated.detach())  # the value is the codes exactly


# ---------------------------------------------------------------------- deterministic row picks
def _mix32(v: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2^32) in int64 (xor-shift / odd-multiply rounds; products stay < 2^59)."""
    v = (((v >> 16) ^ v) * 0x45D9F3B) & _M32
    v = (((v >> 16) ^ v) * 0x45D9F3B) & _M32
    return (v >> 16) ^ v


def _one_hot_size(n: int, world: int, rank: int, like: torch.Tensor) -> torch.Tensor:
    """This rank's row count at its slot, as two exact float32 digits: summed over the ranks,
    every rank learns every rank's count."""
    out = like.new_zeros(world, 2)
    out[rank, 0], out[rank, 1] = n // _SIZE_LO, n % _SIZE_LO
    return out.flatten()


def _pick_rows(rows: torch.Tensor, wanted: torch.Tensor, salt: torch.Tensor, world: int, rank: int,
               sizes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of the batch over all ranks for the wanted codes, on the device.

    Each global row index g (rank 0's rows first) gets the key mix32(g ^ mix32(salt)), distinct
    for distinct rows; the wanted codes, in code order, take the rows with the smallest keys.
    Each rank keeps its K smallest, one all_gather merges them, so every rank (and one process
    holding the concatenated batch) gets the same rows. Returns ``(rows [K, D], ok [K])``: ok is
    False where a code was not wanted or the batch ran out of rows.
    """
    k = wanted.shape[0]
    n, d = rows.shape
    out_dtype = rows.dtype
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # keys' 16-bit halves must be exact
    offset = sizes[:rank].sum() if world > 1 else 0
    index = torch.arange(n, dtype=torch.int64, device=rows.device) + offset
    keys, local = _mix32(index ^ _mix32(salt & _M32)).topk(min(k, n), largest=False)
    cand = torch.cat([(keys >> 16).to(rows.dtype).unsqueeze(1), (keys & 0xFFFF).to(rows.dtype).unsqueeze(1),
                      rows[local]], dim=1)
    if cand.shape[0] < k:  # fewer rows than codes here: pad with keys above every real one
        pad = rows.new_zeros(k - cand.shape[0], d + 2)
        pad[:, 0] = _KEY_HI
        cand = torch.cat([cand, pad])
    if world > 1:
        gathered = cand.new_empty(world * k, d + 2)
        _all_gather_single(gathered, cand)
        merged_keys = gathered[:, 0].to(torch.int64) * _KEY_HI + gathered[:, 1].to(torch.int64)
        cand = gathered[torch.argsort(merged_keys, stable=True)[:k]]
    available = (cand[:, 0] < _KEY_HI).sum()
    order = wanted.to(torch.int64).cumsum(0) - 1  # the i-th wanted code takes the i-th row
    ok = wanted & (order < available)
    return cand[order.clamp(0, k - 1), 2:].to(out_dtype), ok
