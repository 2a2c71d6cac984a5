"""Anatomy of a ViT: where the encoder-level nullspace noise goes.

The ε-approximate nullspace noise of the NS-ViT paper (seed 001, §3.2-3.3, Eq. 3-8, Algorithm 1 line 7)
is one tensor ``v`` of shape ``(1, N_patches, D)``, broadcast over the batch and added to the output
of the patch embedding ``U = f_e(X)``: ``Z' = f_psi(f_phi^0(U + [v]))``.  As in the reference code, it is
added *before* the cls (and distillation) token is prepended and before the position embedding, so the
cls token is never perturbed.

Two ways in, both anchored on timm's own seams instead of a re-implemented forward:

* :func:`inject_noise` -- a context manager that registers a forward hook on ``patch_embed``; inside it a
  plain ``model(x)`` gives the noisy logits (DDP, train mode and gradients included).  Works for any
  model with a timm-style ``patch_embed`` module (ViT, DeiT, BEiT, EVA, Swin...).
* :class:`ViTAnatomy` -- splits a timm ``VisionTransformer`` (DeiT distilled included) into
  ``embed(x)`` (normalise + patch embedding), ``encode(tokens)`` (``_pos_embed``, ``patch_drop``,
  ``norm_pre``, ``blocks``, ``norm``) and ``head(feats)`` (``forward_head``), so that the patch
  embedding of a batch can be computed once and shared between the clean and the noisy pass.

Models without a ``patch_embed`` (CNNs...) have no encoder-level token space; for them use the
input-level variant :func:`ns_plugin.nullspace.search.search_input_noise` (seed 000, §5.3).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from .errors import NSPluginError

_INPUT_LEVEL_HINT = ("encoder-level noise needs a ViT-style `patch_embed` (timm VisionTransformer/DeiT); "
                     "use the input-level variant ns_plugin.nullspace.search.search_input_noise instead")


def _core(model: nn.Module) -> Tuple[Optional[nn.Module], nn.Module]:
    from .models import unwrap
    if not isinstance(model, nn.Module):
        raise NSPluginError(f"expected a torch.nn.Module model, got {type(model).__name__}")
    return unwrap(model)


def patch_embed_of(model: nn.Module) -> nn.Module:
    """The timm ``patch_embed`` module of ``model`` (through ``Normalize`` and DDP wrappers)."""
    _, core = _core(model)
    pe = getattr(core, "patch_embed", None)
    if not isinstance(pe, nn.Module):
        raise NSPluginError(f"{type(core).__name__} has no patch embedding: {_INPUT_LEVEL_HINT}")
    return pe


def _param_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, (p.dtype if p.is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32


def token_shape(model: nn.Module) -> Tuple[int, int]:
    """``(N_patches, D)``: the shape (without the batch dimension) of the patch-embedding output, i.e. of
    the encoder-level noise (seed 001, Alg. 1 line 7; 1x196x768 for ViT-B/16 at 224)."""
    pe = patch_embed_of(model)
    n = getattr(pe, "num_patches", None)
    proj = getattr(pe, "proj", None)
    d = proj.out_channels if isinstance(proj, nn.Conv2d) else None
    if d is None:
        _, core = _core(model)
        d = getattr(core, "embed_dim", None) or getattr(core, "num_features", None)
    if n and d and not getattr(pe, "dynamic_img_size", False):
        return int(n), int(d)
    # fall back to one dummy forward of the patch embedding alone
    from .models import input_size
    size = input_size(model)
    if size is None:
        raise NSPluginError(f"cannot tell the token shape of {type(_core(model)[1]).__name__}: its patch "
                            f"embedding has no fixed image size; build the model with a fixed img_size")
    dev, dt = _param_device_dtype(pe)
    with torch.no_grad():
        out = pe(torch.zeros(1, *size, device=dev, dtype=dt))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.dim() == 4:  # NHWC
        return int(out.shape[1] * out.shape[2]), int(out.shape[3])
    if out.dim() == 3:
        return int(out.shape[1]), int(out.shape[2])
    raise NSPluginError(f"patch embedding of {type(_core(model)[1]).__name__} returns a {out.dim()}-D tensor; "
                        f"{_INPUT_LEVEL_HINT}")


def check_noise(model: nn.Module, noise: torch.Tensor, *, what: str = "noise") -> Tuple[int, int]:
    """Raise :class:`NSPluginError` unless ``noise`` is a finite ``(1, N_patches, D)`` tensor for ``model``."""
    want = token_shape(model)
    if not isinstance(noise, torch.Tensor):
        raise NSPluginError(f"{what} must be a tensor of shape (1, {want[0]}, {want[1]}), got {type(noise).__name__}")
    if tuple(noise.shape) != (1, *want):
        raise NSPluginError(f"{what} has shape {tuple(noise.shape)} but this model's encoder-level noise must be "
                            f"(1, {want[0]}, {want[1]}) = (1, N_patches, D)")
    if not noise.is_floating_point():
        raise NSPluginError(f"{what} must be a floating-point tensor, got {noise.dtype}")
    if not bool(torch.isfinite(noise.detach()).all()):
        raise NSPluginError(f"{what} contains NaN or inf values; pass a finite noise tensor")
    return want


def _add(out, noise: torch.Tensor):
    if isinstance(out, (tuple, list)):  # e.g. dynamic-size patch embeds returning (x, feat_size)
        return type(out)([_add(out[0], noise), *out[1:]])
    v = noise.to(device=out.device, dtype=out.dtype)
    if out.dim() == 4:  # NHWC token grid (dynamic_img_size ViTs, Swin)
        b, h, w, d = out.shape
        return out + v.reshape(1, h, w, d)
    return out + v


@contextlib.contextmanager
def inject_noise(model: nn.Module, noise: Optional[torch.Tensor]) -> Iterator[nn.Module]:
    """Add ``noise`` (``(1, N_patches, D)``, broadcast over the batch) to the patch-embedding output of
    ``model`` while the ``with`` block runs (seed 001, Alg. 1 line 7: ``f_psi(f_phi^0(U + [v]))``).

    The noise enters *after* ``patch_embed`` and *before* the cls/dist token is prepended and the position
    embedding added, so the cls token is never perturbed.  Inside the block a plain ``model(x)`` returns the
    noisy logits -- also for DDP-wrapped models, in train mode, with gradients reaching both the model
    parameters and ``noise``.  ``noise=None`` is a no-op.  The hook is removed on exit, also on exceptions.

    >>> with inject_noise(model, v):
    ...     noisy_logits = model(x)
    """
    if noise is None:
        yield model
        return
    check_noise(model, noise)
    pe = patch_embed_of(model)
    handle = pe.register_forward_hook(lambda mod, inp, out: _add(out, noise))
    try:
        yield model
    finally:
        handle.remove()


class ViTAnatomy(nn.Module):
    """``model(x) == head(encode(embed(x)))`` for a timm ``VisionTransformer`` (wrapped or not in
    ``Sequential(Normalize, net)`` / DDP), with the encoder-level noise entering between ``embed`` and
    ``encode`` (seed 001, Eq. 7: ``f_psi(f_phi^0(u + v))`` with ``u = f_e(x)``).

    * ``embed(x)``: images in [0, 1] -> normalise -> ``patch_embed`` -> tokens ``(N, N_patches, D)``.
    * ``encode(tokens, noise=None)``: ``tokens + noise`` -> ``_pos_embed`` (prepends cls/dist tokens, adds the
      position embedding) -> ``patch_drop`` -> ``norm_pre`` -> ``blocks`` -> ``norm``.
    * ``head(feats)``: timm's ``forward_head`` (cls/avg pooling, DeiT's averaged two heads in eval mode).

    DeiT distilled models and models without a cls token (``class_token=False, global_pool='avg'``) work
    since everything goes through timm's own methods.  The anatomy shares the modules of ``model``
    (no copy), so inside an :func:`inject_noise` block ``embed`` already includes that noise.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        from .models import strip_parallel
        norm, core = _core(strip_parallel(model))
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError:  # pragma: no cover - timm is a hard dependency
            VisionTransformer = ()
        if not hasattr(core, "patch_embed"):
            raise NSPluginError(f"{type(core).__name__} has no patch embedding: {_INPUT_LEVEL_HINT}")
        if not isinstance(core, VisionTransformer):
            raise NSPluginError(f"the embed/encode/head split supports timm VisionTransformer models (ViT, DeiT), "
                                f"not {type(core).__name__}; use inject_noise(model, noise) for its patch_embed "
                                f"or the input-level variant search_input_noise")
        self.normalize = norm
        self.core = core
        self.token_shape = token_shape(core)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.core, "num_prefix_tokens", 0))

    @property
    def has_class_token(self) -> bool:
        return getattr(self.core, "cls_token", None) is not None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise images in [0, 1] and apply the patch embedding ``f_e`` (Alg. 1 line 6)."""
        if self.normalize is not None:
            x = self.normalize(x)
        return self.core.patch_embed(x)

    def encode(self, tokens: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encoder ``f_phi`` on patch tokens (plus the encoder-level ``noise`` if given), timm's seams."""
        c = self.core
        if noise is not None:
            tokens = _add(tokens, noise)
        x = c._pos_embed(tokens)
        x = c.patch_drop(x)
        x = c.norm_pre(x)
        if getattr(c, "grad_checkpointing", False) and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint_seq
            x = checkpoint_seq(c.blocks, x)
        else:
            x = c.blocks(x)
        return c.norm(x)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """Classifier ``f_psi`` (timm ``forward_head``)."""
        return self.core.forward_head(feats)

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.encode(self.embed(x), noise))


def anatomy(model: nn.Module) -> ViTAnatomy:
    """:class:`ViTAnatomy` of ``model`` (raises :class:`NSPluginError` for models it cannot split)."""
    return ViTAnatomy(model)
