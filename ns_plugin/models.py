"""Models: the EasyRobust ``Sequential(Normalize, model)`` convention and the embedded tiny ViT.

Inputs everywhere in ns_plugin are images in [0, 1]; normalisation lives inside the model as its first
module, exactly as EasyRobust's ``benchmarks/benchmark.py`` builds it, so that a state dict has the keys
``0.mean``, ``0.std`` and ``1.*``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import NSPluginError

#: Architecture of the embedded default: a timm ``VisionTransformer`` at 32x32 with 8x8 patches.
DEFAULT_VIT = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=4, num_heads=4,
                   mlp_ratio=2.0, num_classes=10)
#: Channel statistics of the embedded digits training split (see :mod:`ns_plugin.data`).
DIGITS_MEAN = (0.3049, 0.3049, 0.3049)
DIGITS_STD = (0.3233, 0.3233, 0.3233)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with ``mean``/``std`` buffers (EasyRobust's
    ``NormalizeByChannelMeanStd``: same buffer names, so checkpoints interoperate)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


def wrap(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """Return ``Sequential(Normalize(mean, std), model)``: the model then takes images in [0, 1]."""
    return nn.Sequential(Normalize(mean, std), model)


def unwrap(model: nn.Module) -> Tuple[Optional[Normalize], nn.Module]:
    """Split a model into its leading :class:`Normalize` (or ``None``) and the core network.

    DDP/DataParallel ``.module`` wrappers are removed first. Any first module with ``mean``/``std``
    buffers (EasyRobust's class included) counts as the normaliser.
    """
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    if isinstance(model, nn.Sequential) and len(model) == 2:
        first = model[0]
        if hasattr(first, "mean") and hasattr(first, "std"):
            return first, model[1]
    return None, model


def build_default_model(num_classes: int = 10, *, seed: Optional[int] = None,
                        mean: Sequence[float] = DIGITS_MEAN, std: Sequence[float] = DIGITS_STD,
                        **overrides) -> nn.Sequential:
    """The embedded default: ``Sequential(Normalize, timm VisionTransformer)`` (32x32, patch 8,
    4 blocks, width 64). ``overrides`` change any ``VisionTransformer`` argument."""
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(DEFAULT_VIT, num_classes=num_classes)
    cfg.update(overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return wrap(VisionTransformer(**cfg), mean, std)


def input_size(model: nn.Module) -> Optional[Tuple[int, int, int]]:
    """``(C, H, W)`` a model expects, read from timm's ``patch_embed`` or ``pretrained_cfg``, else None."""
    _, core = unwrap(model)
    pe = getattr(core, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        proj = getattr(pe, "proj", None)
        c = proj.in_channels if isinstance(proj, nn.Conv2d) else 3
        if getattr(pe, "dynamic_img_size", False):
            return None
        h, w = pe.img_size
        return (c, int(h), int(w))
    cfg = getattr(core, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    return tuple(size) if size else None


def check_images(x: torch.Tensor, model: Optional[nn.Module] = None, *, what: str = "inputs") -> None:
    """Raise :class:`NSPluginError` unless ``x`` is a finite (N, C, H, W) batch in [0, 1] of the size
    ``model`` expects."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise NSPluginError(f"{what} must be a (N, C, H, W) image batch, got {shape}")
    if x.shape[0] == 0:
        raise NSPluginError(f"{what} are an empty batch (N = 0); pass at least one image")
    if not x.is_floating_point():
        raise NSPluginError(f"{what} must be float images in [0, 1], got dtype {x.dtype}; convert with x.float() / 255")
    if model is not None:
        p = next(iter(model.parameters()), None)
        if p is not None and p.is_floating_point() and x.dtype != p.dtype:
            raise NSPluginError(f"{what} are {str(x.dtype).replace('torch.', '')} but the model's weights are "
                                f"{str(p.dtype).replace('torch.', '')}; convert with x.to({p.dtype})")
    if not torch.isfinite(x).all():
        raise NSPluginError(f"{what} contain NaN or inf values; pass finite images in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise NSPluginError(f"{what} must be images in [0, 1] (normalisation lives inside the model), "
                            f"got values in [{lo:.3g}, {hi:.3g}]")
    if model is not None:
        want = input_size(model)
        if want is not None and tuple(x.shape[1:]) != tuple(want):
            raise NSPluginError(f"{what} have shape {tuple(x.shape[1:])} but the model expects {tuple(want)}; "
                                f"resize the images to {want[1]}x{want[2]}")
