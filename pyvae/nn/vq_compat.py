"""``pyvae.nn.VectorQuantize``: a drop-in for ``vector_quantize_pytorch.VectorQuantize`` (1.32),
a thin mapping onto :class:`pyvae.nn.VectorQuantizer` (EMA codebook)."""
from __future__ import annotations

import torch
from torch import nn

from .vq import VectorQuantizer

__all__ = ["VectorQuantize"]

# vector_quantize_pytorch 1.32.0's other constructor arguments and the values that mean "off" (its
# default, and for a default of None the value it resolves to here). Anything else raises.
UNSUPPORTED_ARGS = {
    "heads": (1,), "separate_codebook_per_head": (False,), "freeze_codebook": (False,), "sync_kmeans": (True,),
    "layernorm_after_project_in": (False,), "accept_3d_fmap": (False,),
    "commitment_use_cross_entropy_loss": (False,), "orthogonal_reg_weight": (0.0,),
    "orthogonal_reg_active_codes_only": (False,), "orthogonal_reg_max_codes": (None,),
    "codebook_diversity_loss_weight": (0.0,), "codebook_diversity_temperature": (100.0,),
    "stochastic_sample_codes": (False,), "sample_codebook_temp": (1.0,), "straight_through": (False,),
    "directional_reparam": (False,), "directional_reparam_variance": (5e-3,), "sync_affine_param": (False,),
    "ema_update": (None, True), "vq_bridge": (None,), "manual_ema_update": (False,),
    "learnable_codebook": (None, False), "in_place_codebook_optimizer": (None,),
    "manual_in_place_optimizer_update": (False,), "affine_param": (False,), "affine_param_batch_decay": (0.99,),
    "affine_param_codebook_decay": (0.9,), "sync_update_v": (0.0,), "return_zeros_for_masked_padding": (True,),
    "route_gradients_to_input": (True,),
}
_FORWARD_OFF = {"indices": None, "mask": None, "lens": None, "topk": None, "sample_codebook_temp": None,
                "freeze_codebook": None, "return_loss_breakdown": False, "codebook_transform_fn": None,
                "ema_update_weight": None, "accum_ema_update": False, "ema_update": None}


def _is_off(value, allowed) -> bool:
    return any(value is a if a is None or isinstance(a, bool) else
               (not isinstance(value, bool) and value == a) for a in allowed)


def check_options(owner: str, options: dict, unsupported: dict, accepted=frozenset()) -> dict:
    """The keyword arguments of ``owner`` it passes on (their names in ``accepted``). One of
    ``unsupported`` (name -> the values that mean "off", vector-quantize-pytorch's default first) set
    to anything else raises NotImplementedError naming it; an unknown name TypeError."""
    kept = {}
    for name, value in options.items():
        if name in accepted:
            kept[name] = value
        elif name not in unsupported:
            raise TypeError(f"{owner} got an unexpected keyword argument {name!r}")
        elif not _is_off(value, unsupported[name]):
            raise NotImplementedError(f"{owner}: {name}={value!r} is not supported by pyvae "
                                      f"(only vector-quantize-pytorch's default {unsupported[name][0]!r})")
    return kept


class VectorQuantize(nn.Module):
    """``vector_quantize_pytorch.VectorQuantize`` (version 1.32) on pyvae's fused ops.

    Same constructor, defaults and ``forward(x) -> (quantized, indices, loss)`` for one codebook
    with EMA updates: ``dim, codebook_size, codebook_dim, decay, eps, kmeans_init, kmeans_iters,
    use_cosine_sim, threshold_ema_dead_code, channel_last, accept_image_fmap, commitment_weight,
    rotation_trick`` (default: on when ``dim > 1``) and ``sync_codebook``; every other argument of
    vector-quantize-pytorch, set to anything but its default, raises ``NotImplementedError`` naming
    it. Arguments after ``codebook_dim`` are keyword-only. Inputs ``[B, N, dim]`` (``[B, dim, N]``
    with ``channel_last=False``), ``[B, dim]``, or ``[B, dim, H, W]`` with ``accept_image_fmap``.

    The state_dict has vector-quantize-pytorch's keys and shapes (``_codebook.embed [1, K, D]``,
    ``_codebook.cluster_size [1, K]``, ``_codebook.embed_avg [1, K, D]``, ``_codebook.initted``,
    ``project_in`` / ``project_out`` when ``codebook_dim != dim``), so checkpoints load both ways;
    for one seed the initial state is the one vector-quantize-pytorch draws. From the same state:
    eval mode gives the same indices and output (and loss 0, and no gradient to x, as there);
    training mode quantises with the codes before the step, then updates ``cluster_size``,
    ``embed_avg`` and the codebook with its decay, eps and Laplace smoothing, then restarts the
    codes whose ``cluster_size`` fell below ``threshold_ema_dead_code`` (count reset to the
    threshold), all as there; the loss is ``commitment_weight * mse(x, codes)``.

    Differences: the rows that restart dead codes and seed k-means are picked by a deterministic
    hash (identical on every process) rather than ``torch.randperm``; after k-means an empty
    cluster keeps its centroid (vector-quantize-pytorch sets it to zero); the nearest code is
    found by pyvae's search (squared L2; for cosine, L2 between unit vectors), so a near-tie may
    resolve differently at float32 rounding level.
    """

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int | None = None, *, decay: float = 0.8,
                 eps: float = 1e-5, kmeans_init: bool = False, kmeans_iters: int = 10, use_cosine_sim: bool = False,
                 threshold_ema_dead_code: float = 0, channel_last: bool = True, accept_image_fmap: bool = False,
                 commitment_weight: float = 1.0, rotation_trick: bool | None = None,
                 sync_codebook: bool | None = None, **unsupported) -> None:
        super().__init__()
        check_options("VectorQuantize", unsupported, UNSUPPORTED_ARGS)
        for name, value in (("dim", dim), ("codebook_size", codebook_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if codebook_dim is not None and (isinstance(codebook_dim, bool) or not isinstance(codebook_dim, int)
                                         or codebook_dim < 1):
            raise ValueError(f"codebook_dim must be None or a positive int, got {codebook_dim!r}")
        if sync_codebook not in (None, True, False):
            raise ValueError(f"sync_codebook must be None, True or False, got {sync_codebook!r}")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        rotation_trick = dim > 1 if rotation_trick is None else rotation_trick
        self.dim, self.codebook_size, self.codebook_dim = dim, codebook_size, codebook_dim
        self.channel_last, self.accept_image_fmap = channel_last, accept_image_fmap
        self.commitment_weight, self.rotation_trick, self.use_cosine_sim = commitment_weight, bool(rotation_trick), use_cosine_sim
        # the same modules, in the same order, as vector-quantize-pytorch: one seed, one initial state
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        with torch.random.fork_rng(devices=[]):  # the layer's own random init must not shift the stream
            self._codebook = VectorQuantizer(
                codebook_size, codebook_dim, beta=max(float(commitment_weight), 0.0), ema_decay=decay, eps=eps,
                sync_ema=sync_codebook is not False, dead_code_threshold=threshold_ema_dead_code,
                kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, cosine=use_cosine_sim,
                straight_through="rotation" if rotation_trick else "identity")
        if kmeans_init:
            embed = torch.zeros(codebook_size, codebook_dim)
        else:
            embed = torch.empty(1, codebook_size, codebook_dim)
            nn.init.kaiming_uniform_(embed)  # vector-quantize-pytorch's uniform_init
            embed = embed[0]
            if use_cosine_sim:
                embed = torch.nn.functional.normalize(embed, dim=-1, eps=1e-6)
        with torch.no_grad():
            self._codebook.codebook.copy_(embed)
            self._codebook.ema_sums.copy_(embed)
        self._codebook.register_buffer("initted", self._codebook.initted, persistent=True)
        self._codebook.register_state_dict_post_hook(_save_as_vqp)
        self._codebook.register_load_state_dict_pre_hook(_load_from_vqp)

    @property
    def codebook(self) -> torch.Tensor:
        return self._codebook.codebook

    @codebook.setter
    def codebook(self, codes: torch.Tensor) -> None:
        with torch.no_grad():
            self._codebook.codebook.copy_(codes)

    @property
    def ema_update(self) -> bool:
        return True

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        codes = self.codebook[indices]
        if not self.channel_last or self.accept_image_fmap:
            codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.get_codes_from_indices(indices))

    def forward(self, x: torch.Tensor, **options):
        for name, value in options.items():
            if name not in _FORWARD_OFF:
                raise TypeError(f"VectorQuantize.forward got an unexpected keyword argument {name!r}")
            if value is not _FORWARD_OFF[name] and not (value is False and _FORWARD_OFF[name] is None):
                raise NotImplementedError(f"VectorQuantize.forward: {name} is not supported by pyvae")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        expected = 4 if self.accept_image_fmap else (2, 3)
        if x.dim() not in ((expected,) if isinstance(expected, int) else expected):
            raise ValueError(f"x must be {'[B, dim, H, W]' if self.accept_image_fmap else '[B, N, dim] or [B, dim]'}, "
                             f"got shape {tuple(x.shape)}")
        only_one = x.dim() == 2
        transpose = not self.channel_last and not self.accept_image_fmap and not only_one
        if self.accept_image_fmap:
            height, width = x.shape[-2:]
            x = x.flatten(2).transpose(1, 2)
        elif only_one:
            x = x.unsqueeze(1)
        elif transpose:
            x = x.transpose(1, 2)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has {x.shape[-1]} features where dim = {self.dim} was expected (shape {tuple(x.shape)})")
        x = self.project_in(x)
        if not self.training and not self._codebook._initted:
            self._codebook.init_codebook(x)  # vector-quantize-pytorch initialises on any first forward
        result = self._codebook(x)
        quantized, indices = result.quantized, result.indices
        if self.training:
            loss = result.loss
        else:  # vector-quantize-pytorch: no gradient to the input and no loss in eval mode
            quantized = quantized.detach()
            loss = torch.zeros((), device=x.device)
        quantized = self.project_out(quantized)
        if self.accept_image_fmap:
            quantized = quantized.transpose(1, 2).reshape(quantized.shape[0], -1, height, width)
            indices = indices.reshape(indices.shape[0], height, width)
        elif only_one:
            quantized, indices = quantized.squeeze(1), indices.squeeze(1)
        elif transpose:
            quantized = quantized.transpose(1, 2)
        return quantized, indices, loss

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
                f"rotation_trick={self.rotation_trick}")


# vector-quantize-pytorch's names (their shapes have a leading 1: one codebook) -> the layer's
_VQP_NAMES = {"embed": "codebook", "cluster_size": "ema_counts", "embed_avg": "ema_sums"}


def _save_as_vqp(module, state_dict, prefix, local_metadata) -> None:
    theirs = {their: state_dict.pop(prefix + our).unsqueeze(0) for their, our in _VQP_NAMES.items()}
    state_dict[prefix + "initted"] = state_dict.pop(prefix + "initted")
    for their in ("cluster_size", "embed_avg", "embed"):  # their order
        state_dict[prefix + their] = theirs[their]


def _load_from_vqp(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                   error_msgs) -> None:
    for their, our in _VQP_NAMES.items():
        if prefix + their in state_dict:
            t = state_dict.pop(prefix + their)
            # any other shape is left for load_state_dict's size-mismatch message
            state_dict[prefix + our] = t[0] if t.dim() > 1 and t.shape[0] == 1 else t
