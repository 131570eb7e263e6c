"""``pyvae.nn.FSQ``: a drop-in for ``vector_quantize_pytorch.FSQ`` (1.32), finite scalar
quantization (Mentzer et al. 2023) on pyvae's fused op :func:`pyvae.finite_scalar_quantize`."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..ops.fsq import finite_scalar_quantize

__all__ = ["FSQ"]

# vector_quantize_pytorch 1.32's other constructor arguments and the values that mean "off".
_UNSUPPORTED = {"noise_dropout": 0.0, "bound_hard_clamp": False, "orthogonal_rotation": False,
                "force_quantization_f32": True}


class FSQ(nn.Module):
    """``vector_quantize_pytorch.FSQ`` (version 1.32) with the bound, rounding, straight-through
    gradient and code indices in one fused op (one pass forward, one pass backward).

    Same constructor and defaults for ``levels, dim, num_codebooks, keep_num_codebooks_dim, scale,
    allowed_dtypes, channel_first, projection_has_bias, return_indices, preserve_symmetry``;
    ``noise_dropout``, ``bound_hard_clamp``, ``orthogonal_rotation`` and ``force_quantization_f32``
    only at their defaults (anything else raises ``NotImplementedError`` naming it). The same
    ``forward(z) -> (out, indices)`` (int32 indices, ``[..., num_codebooks]`` when
    ``keep_num_codebooks_dim``), ``quantize``, ``codes_to_indices``, ``indices_to_codes``,
    ``indices_to_level_indices``, ``codebook_size``, ``implicit_codebook``, and the same modules
    (``project_in``, ``project_out`` when ``dim != len(levels) * num_codebooks``): one seed gives
    the same initial weights and a state_dict loads both ways.

    The codes are computed in float32 (float64 for float64 inputs, on the ``torch`` backend) and
    returned in the input's dtype, as the peer does with ``force_quantization_f32``. A value of z
    exactly at a rounding boundary may land one level apart from the peer's when tanh differs by
    an ulp.
    """

    def __init__(self, levels: Sequence[int], dim: Optional[int] = None, num_codebooks: int = 1,
                 keep_num_codebooks_dim: Optional[bool] = None, scale: Optional[float] = None,
                 allowed_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64), channel_first: bool = False,
                 projection_has_bias: bool = True, return_indices: bool = True, force_quantization_f32: bool = True,
                 preserve_symmetry: bool = False, noise_dropout: float = 0.0, bound_hard_clamp: bool = False,
                 orthogonal_rotation: bool = False, *, backend: str = "auto") -> None:
        super().__init__()
        given = {"noise_dropout": noise_dropout, "bound_hard_clamp": bound_hard_clamp,
                 "orthogonal_rotation": orthogonal_rotation, "force_quantization_f32": force_quantization_f32}
        for name, value in given.items():
            if value != _UNSUPPORTED[name]:
                raise NotImplementedError(f"FSQ: {name}={value!r} is not supported by pyvae (only "
                                          f"vector-quantize-pytorch's default {_UNSUPPORTED[name]!r})")
        try:
            levels = [int(v) for v in levels]
        except (TypeError, ValueError):
            raise TypeError(f"levels must be a sequence of ints, got {levels!r}") from None
        if not levels or min(levels) < 2:
            raise ValueError(f"levels must be a non-empty sequence of ints >= 2, got {levels}")
        if 2 in levels and not preserve_symmetry:
            raise ValueError("levels of 2 need preserve_symmetry=True (as in vector-quantize-pytorch), got "
                             f"levels {levels}")
        if isinstance(num_codebooks, bool) or not isinstance(num_codebooks, int) or num_codebooks < 1:
            raise ValueError(f"num_codebooks must be a positive int, got {num_codebooks!r}")
        keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim must be True (or None) with num_codebooks > 1")
        self.levels = tuple(levels)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.tensor([1] + levels[:-1]), dim=0, dtype=torch.int32),
                             persistent=False)
        self.scale, self.preserve_symmetry, self.noise_dropout = scale, preserve_symmetry, 0.0
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = self.effective_codebook_dim if dim is None else dim
        self.channel_first = channel_first
        self.has_projections = self.dim != self.effective_codebook_dim
        # the same modules, in the same order, as vector-quantize-pytorch: one seed, one initial state
        self.project_in = (nn.Linear(self.dim, self.effective_codebook_dim, bias=projection_has_bias)
                           if self.has_projections else nn.Identity())
        self.project_out = (nn.Linear(self.effective_codebook_dim, self.dim, bias=projection_has_bias)
                            if self.has_projections else nn.Identity())
        self.return_indices = return_indices
        self.codebook_size = math.prod(levels)
        if self.codebook_size >= 2**31:
            raise ValueError(f"levels must have a product below 2**31 (int32 indices), got {self.codebook_size}")
        if return_indices:
            self.register_buffer("implicit_codebook", self._indices_to_codes(torch.arange(self.codebook_size)),
                                 persistent=False)
        self.allowed_dtypes = allowed_dtypes
        self.force_quantization_f32 = True
        self.bound_hard_clamp = False
        self.orthogonal_rotation = False
        self.backend = backend

    # ------------------------------------------------------------------ codes and indices
    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """The codes of ``z`` ``[..., codebook_dim]`` in [-1, 1], with the straight-through gradient."""
        return self._quantize(z, want_indices=False)[0]

    def _quantize(self, z: torch.Tensor, want_indices: bool):
        backend = "torch" if self.backend == "auto" and z.dtype == torch.float64 else self.backend
        return finite_scalar_quantize(z, self.levels, preserve_symmetry=self.preserve_symmetry,
                                      return_indices=want_indices, backend=backend)

    def _scale_and_shift(self, codes: torch.Tensor) -> torch.Tensor:
        if self.preserve_symmetry:
            return (codes + 1.0) / (2.0 / (self._levels - 1))
        half_width = self._levels // 2
        return codes * half_width + half_width

    def _scale_and_shift_inverse(self, level_indices: torch.Tensor) -> torch.Tensor:
        if self.preserve_symmetry:
            return level_indices * (2.0 / (self._levels - 1)) - 1.0
        half_width = self._levels // 2
        return (level_indices - half_width) / half_width

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Each index's level per dimension ``[..., codebook_dim]``."""
        return (indices.unsqueeze(-1) // self._basis) % self._levels

    def _indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self._scale_and_shift_inverse(self.indices_to_level_indices(indices))

    def codes_to_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        """The int32 index of each code ``[..., codebook_dim]``."""
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"zhat must have codebook_dim = {self.codebook_dim} in its last dim, got "
                             f"{tuple(zhat.shape)}")
        return (self._scale_and_shift(zhat) * self._basis).sum(dim=-1).round().to(torch.int32)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """The output (projected out, channel-first for images or with ``channel_first``) of ``indices``."""
        is_img_or_video = indices.dim() >= 3 + int(self.keep_num_codebooks_dim)
        codes = self._indices_to_codes(indices)
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        codes = self.project_out(codes)
        if is_img_or_video or self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes

    # ------------------------------------------------------------------ forward
    def forward(self, z: torch.Tensor):
        """``(out, indices)`` for ``z`` ``[B, N, dim]`` (``[B, dim, ...]`` with ``channel_first``
        or for images and video, ``[B, dim, H, W(, T)]``)."""
        if not isinstance(z, torch.Tensor) or z.dim() < 3:
            raise ValueError(f"z must be a tensor [B, N, dim] (or [B, dim, ...] for images), got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        move_channel_last = z.dim() >= 4 or self.channel_first
        if move_channel_last:
            z = z.movedim(1, -1)
            spatial = z.shape[1:-1]
            z = z.reshape(z.shape[0], -1, z.shape[-1])
        if z.shape[-1] != self.dim:
            raise ValueError(f"z must have dim = {self.dim} features, got {z.shape[-1]}")
        z = self.project_in(z).unflatten(-1, (self.num_codebooks, self.codebook_dim))
        codes, indices = self._quantize(z, want_indices=self.return_indices)
        out = self.project_out(codes.flatten(-2))
        if move_channel_last:
            out = out.unflatten(1, spatial).movedim(-1, 1)
            if indices is not None:
                indices = indices.unflatten(1, spatial)
        if indices is not None and not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return out, indices

    def extra_repr(self) -> str:
        return (f"levels={list(self.levels)}, dim={self.dim}, num_codebooks={self.num_codebooks}, "
                f"preserve_symmetry={self.preserve_symmetry}")
