"""pyvae's fused posterior inside diffusers' autoencoders.

::

    from pyvae.integrations.diffusers import use_pyvae_posterior
    vae = diffusers.AutoencoderKL(...)
    use_pyvae_posterior(vae)            # vae.encode(x).latent_dist is now pyvae's posterior
    use_pyvae_posterior(vae, False)     # and back to diffusers'

The model's ``encode`` is wrapped on the instance (the class and its weights are untouched, nothing
is copied): whatever it returns that is a diffusers ``DiagonalGaussianDistribution`` (the
``latent_dist`` of an ``AutoencoderKLOutput``, or an element of the tuple ``return_dict=False``
gives) is handed back as a :class:`pyvae.nn.DiagonalGaussianDistribution` of the same parameters.
The model's own ``forward`` calls ``self.encode``, so it uses the fused posterior too.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch

from ..nn.posterior import DiagonalGaussianDistribution

__all__ = ["use_pyvae_posterior", "pyvae_posterior"]

_WRAPPED = "_pyvae_posterior_original_encode"


def _diffusers_posterior_class() -> type:
    try:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as theirs
    except ImportError as exc:
        raise ImportError("pyvae.integrations.diffusers needs diffusers (pip install diffusers); "
                          f"importing it failed: {exc}") from None
    return theirs


def _convert(out, theirs: type):
    if isinstance(out, theirs):
        return DiagonalGaussianDistribution(out.parameters, deterministic=out.deterministic)
    if isinstance(out, tuple):
        return type(out)(_convert(o, theirs) for o in out) if not hasattr(out, "_fields") else \
            type(out)(*(_convert(o, theirs) for o in out))
    latent = getattr(out, "latent_dist", None)
    if isinstance(latent, theirs):
        out.latent_dist = _convert(latent, theirs)
    return out


def _encode_with_pyvae_posterior(model, *args, **kwargs):
    return _convert(type(model).encode(model, *args, **kwargs), _diffusers_posterior_class())


def use_pyvae_posterior(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Makes ``model.encode`` return pyvae's fused posterior (``enabled=False``: diffusers' again);
    returns the model. ``model`` is any module with an ``encode`` whose output holds a diffusers
    ``DiagonalGaussianDistribution`` (``AutoencoderKL`` and the video/audio autoencoders built like
    it); a TypeError names a model without ``encode``. Idempotent either way."""
    _diffusers_posterior_class()  # the clear error where diffusers is missing
    if not callable(getattr(model, "encode", None)):
        raise TypeError(f"use_pyvae_posterior: {type(model).__name__} has no encode() method (expected a diffusers "
                        f"autoencoder such as AutoencoderKL)")
    wrapped = _WRAPPED in model.__dict__
    if enabled and not wrapped:
        # a method bound to the model (not a closure over it), so that a deepcopy of the model (an
        # EMA copy, say) gets one bound to the copy
        model.__dict__["encode"] = types.MethodType(_encode_with_pyvae_posterior, model)
        model.__dict__[_WRAPPED] = True
    elif not enabled and wrapped:
        del model.__dict__["encode"]
        del model.__dict__[_WRAPPED]
    return model


@contextlib.contextmanager
def pyvae_posterior(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``with pyvae_posterior(vae): ...``: :func:`use_pyvae_posterior` for the block, then as before."""
    was = _WRAPPED in model.__dict__
    use_pyvae_posterior(model)
    try:
        yield model
    finally:
        use_pyvae_posterior(model, was)
