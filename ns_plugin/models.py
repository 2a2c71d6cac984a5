"""Models: the EasyRobust ``Sequential(Normalize, model)`` convention and the embedded tiny ViT.

Inputs everywhere in ns_plugin are images in [0, 1]; normalisation lives inside the model as its first
module, exactly as EasyRobust's ``benchmarks/benchmark.py`` builds it, so that a state dict has the keys
``0.mean``, ``0.std`` and ``1.*``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

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


def strip_parallel(model: nn.Module) -> nn.Module:
    """Remove ``.module`` wrappers (DistributedDataParallel, DataParallel, timm's ``ModelEma*``); keeps the
    ``Sequential(Normalize, net)``. The one DDP unwrapper of ns_plugin."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return model


def unwrap(model: nn.Module) -> Tuple[Optional[Normalize], nn.Module]:
    """Split a model into its leading :class:`Normalize` (or ``None``) and the core network.

    DDP/DataParallel ``.module`` wrappers are removed first (:func:`strip_parallel`). Any first module with
    ``mean``/``std`` buffers (EasyRobust's class included) counts as the normaliser.
    """
    model = strip_parallel(model)
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


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """The one top-1 accuracy helper: fraction (in [0, 1]) of ``model`` on images ``x`` in [0, 1], in eval mode."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size].to(dev)).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    model.train(was)
    return correct / max(len(x), 1)


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


# ----------------------------------------------------------------------------------------------------------
# the one model door
# ----------------------------------------------------------------------------------------------------------
#: Names of the embedded architecture: ``"default"`` (CLI/config spelling) and its timm name.
DIGITS_MODEL = "ns_vit_digits"
_DEFAULT_NAMES = ("default", DIGITS_MODEL)
_HEAD_KEYS = ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight", "head.fc.fc.weight")


def bare_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """EasyRobust's ``Sequential(Normalize, model)`` keys (``0.mean``, ``0.std``, ``1.*``) -> the bare model's;
    a bare state dict is returned as is (copied)."""
    if "0.mean" in sd or any(k.startswith("1.") for k in sd):
        return {k[2:]: v for k, v in sd.items() if k.startswith("1.")}
    return dict(sd)


def num_classes_of(sd: Dict[str, torch.Tensor]) -> Optional[int]:
    """The number of classes of a (wrapped or bare) state dict, read from its classifier weight; None when
    no known classifier key is present. The one place that finds a checkpoint's class count."""
    bare = bare_state_dict(sd)
    for k in _HEAD_KEYS:
        w = bare.get(k)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            return int(w.shape[0])
    return None


def build_net(arch, *, num_classes: Optional[int] = None, pretrained: bool = False, **kwargs) -> nn.Module:
    """A bare classifier for ``arch``: ``"default"``/``"ns_vit_digits"`` (the embedded ViT's architecture,
    untrained), a timm model name, or a dict of timm ``VisionTransformer`` arguments."""
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(kwargs)
    if num_classes is not None:
        kw["num_classes"] = int(num_classes)
    if isinstance(arch, dict):
        return VisionTransformer(**{**arch, **kw})
    if arch in _DEFAULT_NAMES:
        if pretrained:
            raise NSPluginError(f"{arch!r} has no downloadable weights; use create_model('default') for the "
                                f"trained embedded model or pass checkpoint=")
        return VisionTransformer(**{**DEFAULT_VIT, **kw})
    if not isinstance(arch, str):
        raise NSPluginError(f"unknown model {arch!r}: use 'default', a timm model name (see timm.list_models()) "
                            f"or a checkpoint file")
    from .weights import create_timm
    return create_timm(arch, pretrained=pretrained, **kw)  # cached weights offline, one-line errors


def _looks_like_file(name) -> bool:
    import os
    if isinstance(name, os.PathLike):
        return True
    return isinstance(name, str) and (os.sep in name or "/" in name or name.endswith((".pth", ".pt", ".tar", ".bin"))
                                      or os.path.isfile(name))


def create_model(name_or_checkpoint="default", *, checkpoint=None, pretrained: bool = False,
                 num_classes: Optional[int] = None, use_ema: bool = False, trust: bool = False,
                 progress: bool = False) -> nn.Sequential:
    """The one way ns_plugin builds a model: returns ``Sequential(Normalize, net)`` taking images in [0, 1].

    Args:
        name_or_checkpoint: ``"default"`` (the embedded tiny ViT: trained and cached on first use unless a
            ``checkpoint`` is given), ``"ns_vit_digits"`` (its architecture), a timm model name, or the path of
            a checkpoint whose ``meta["arch"]`` (or ``meta["model"]``) names the architecture.
        checkpoint: a checkpoint file or URL (downloaded once into the torch hub cache) whose weights are loaded,
            in any format :mod:`ns_plugin.weights` reads (ours, EasyRobust's ``Sequential``, plain timm, training
            checkpoints with ``state_dict`` / ``state_dict_ema`` / ``model``, ``module.`` prefixes); its class
            count sets the classifier size; ``0.mean``/``0.std`` entries set the normaliser.
        pretrained: timm's pretrained weights, read from the Hugging Face / torch hub caches or downloaded;
            offline and not cached, one line naming the model and the caches (:mod:`ns_plugin.weights`).
        num_classes: classifier size; with a checkpoint it must agree with the checkpoint's.
        use_ema: load the checkpoint's EMA weights (``state_dict_ema`` / ``model_ema``).
        trust: allow a checkpoint that needs full unpickling (only for files you trust).

    Without a checkpoint the normaliser takes timm's ``pretrained_cfg`` mean/std (the digits statistics for the
    embedded architecture).
    """
    from .checkpoint import load_into
    from .weights import is_url, read_init

    name = name_or_checkpoint
    if name is None or name == "":
        name = "default"
    if _looks_like_file(name) or (isinstance(name, str) and is_url(name)):
        if checkpoint is not None:
            raise NSPluginError("pass the checkpoint either as the first argument or as checkpoint=, not both")
        checkpoint = str(name)
        name = None
    sd = None
    if checkpoint is not None:
        sd, ckpt = read_init(str(checkpoint), use_ema=use_ema, trust=trust, progress=progress)
        if name is None:
            meta = ckpt.get("meta") or {}
            # ours: meta["arch"]; timm's / EasyRobust's CheckpointSaver: a top-level "arch" (the --model flag)
            name = next((a for a in (meta.get("arch"), meta.get("model"), ckpt.get("arch"))
                         if isinstance(a, dict) or (isinstance(a, str) and a)), None)
            if name is None:
                raise NSPluginError(f"checkpoint {checkpoint} does not name its architecture (meta['arch']); "
                                    f"pass the model name, e.g. create_model('vit_base_patch16_224', checkpoint=...)")
            if isinstance(name, str) and name not in _DEFAULT_NAMES:
                import timm
                if not timm.is_model(name) and isinstance(meta.get("model"), str):
                    name = meta["model"]
        k = num_classes_of(sd)
        if num_classes is not None and k is not None and int(num_classes) != k:
            raise NSPluginError(f"checkpoint {checkpoint} has {k} classes, not num_classes={num_classes}")
        num_classes = k if k is not None else num_classes
    elif name == "default":
        if num_classes not in (None, DEFAULT_VIT["num_classes"]):
            raise NSPluginError(f"the embedded default model has {DEFAULT_VIT['num_classes']} classes, not "
                                f"{num_classes}; drop num_classes or use a timm model name")
        import copy
        from .embedded import default_model
        return copy.deepcopy(default_model(progress=progress)[0]).eval()

    net = build_net(name, num_classes=num_classes, pretrained=pretrained and sd is None)
    if sd is not None and "0.mean" in sd and "0.std" in sd:
        mean, std = sd["0.mean"].reshape(-1).tolist(), sd["0.std"].reshape(-1).tolist()
    elif isinstance(name, str) and name in _DEFAULT_NAMES:
        mean, std = DIGITS_MEAN, DIGITS_STD
    else:
        dc = getattr(net, "pretrained_cfg", None) or {}
        mean, std = dc.get("mean", (0.485, 0.456, 0.406)), dc.get("std", (0.229, 0.224, 0.225))
    model = wrap(net, mean, std)
    if sd is not None:
        if "0.mean" in sd or any(k.startswith("1.") for k in sd):
            load_into(model, sd, source=f"checkpoint {checkpoint}")
        else:
            load_into(net, sd, source=f"checkpoint {checkpoint}")
        model.eval()
    return model


def model_num_classes(model) -> Optional[int]:
    """The number of outputs of a classifier (timm's ``num_classes``, else its last ``Linear`` layer)."""
    _, core = unwrap(strip_parallel(model))
    n = getattr(core, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    last = None
    for m in core.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last.out_features if last is not None else None
