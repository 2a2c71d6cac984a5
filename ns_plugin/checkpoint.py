"""Safe checkpoint I/O shared by every part of ns_plugin.

Format (EasyRobust's ``benchmarks/benchmark.py`` reads it as is)::

    {"state_dict": {"0.mean", "0.std", "1.<timm keys>"...},
     "state_dict_ema": {...} or absent,
     "meta": {plain str/int/float/bool/list/dict: architecture, method, metrics...}}

Everything in it loads with ``torch.load(weights_only=True)``. Writes are atomic (temp file + rename).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from .errors import NSPluginError

_PLAIN = (str, int, float, bool, type(None))


def _check_plain(obj: Any, where: str = "meta") -> None:
    if isinstance(obj, _PLAIN) or isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise NSPluginError(f"{where} has a key of type {type(k).__name__}; use str keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise NSPluginError(f"{where} holds a {type(obj).__name__}, which weights_only loading refuses; "
                        f"store plain numbers, strings, lists, dicts or tensors")


def state_dict_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict without DDP/DataParallel ``module.`` wrappers, tensors detached on CPU."""
    from .models import strip_parallel
    model = strip_parallel(model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def atomic_save(obj: Any, path: os.PathLike | str) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    from .io import atomic_write
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(path: os.PathLike | str, model: nn.Module, *, ema: Optional[nn.Module] = None,
                    meta: Optional[Dict[str, Any]] = None, **extra: Any) -> Path:
    """Write ``model`` (and optionally its EMA copy) in the safe format above, atomically.

    ``model`` should be ``Sequential(Normalize, net)`` so the keys are ``0.mean``, ``0.std``, ``1.*``.
    ``extra`` entries (optimiser state, RNG states...) must themselves be weights_only-loadable.
    """
    payload: Dict[str, Any] = {"state_dict": state_dict_of(model)}
    if ema is not None:
        payload["state_dict_ema"] = state_dict_of(ema)
    payload["meta"] = dict(meta or {})
    payload.update(extra)
    for k, v in payload.items():
        if k not in ("state_dict", "state_dict_ema"):
            _check_plain(v, k)
    return atomic_save(payload, path)


def strip_prefix(sd: Dict[str, Any], prefix: str = "module.") -> Dict[str, Any]:
    """Remove a leading ``prefix`` (DDP's ``module.``) from every key that has it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def read_checkpoint(path: os.PathLike | str, *, trust: bool = False,
                    map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint file as a dict with ``state_dict`` (``module.`` prefixes stripped), and
    ``state_dict_ema``/``meta`` when present.

    Loads with ``weights_only=True``. A file that needs arbitrary unpickling is refused unless
    ``trust=True`` (only for files you made or trust: unpickling can run code).
    A bare state dict (no ``state_dict`` entry) is accepted too.
    """
    path = Path(path)
    if not path.is_file():
        raise NSPluginError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        if not trust:
            raise NSPluginError(f"checkpoint {path} contains pickled Python objects that weights_only loading "
                                f"refuses; re-save it as a state dict, or pass trust=True (--trust-checkpoint) "
                                f"if you trust its source") from None
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError) as e:
        raise NSPluginError(f"checkpoint {path} is not a readable torch file ({str(e).splitlines()[0][:120]})") from None
    if isinstance(ckpt, nn.Module):  # only reachable with trust=True
        ckpt = ckpt.state_dict()
    if not isinstance(ckpt, dict):
        raise NSPluginError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state dict")
    if "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):
        out = dict(ckpt)
    elif "model" in ckpt and isinstance(ckpt["model"], dict):  # timm/DeiT training scripts
        out = {k: v for k, v in ckpt.items() if k != "model"}
        out["state_dict"] = ckpt["model"]
    else:
        out = {"state_dict": ckpt}
    out["state_dict"] = strip_prefix(out["state_dict"])
    if isinstance(out.get("state_dict_ema"), dict):
        out["state_dict_ema"] = strip_prefix(out["state_dict_ema"])
    out.setdefault("meta", {})
    return out


def load_into(model: nn.Module, state_dict: Dict[str, torch.Tensor], *, source: str = "checkpoint") -> nn.Module:
    """``model.load_state_dict`` with one clear error when the checkpoint is for another architecture."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {k}: checkpoint "
                         f"{list(state_dict[k].shape)} vs model {list(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise NSPluginError(f"{source} does not fit this model ({'; '.join(parts)}); "
                            f"it was saved for another architecture")
    model.load_state_dict(state_dict)
    return model


def load_checkpoint(path: os.PathLike | str, model: nn.Module, *, use_ema: bool = False,
                    trust: bool = False) -> nn.Module:
    """Load weights from ``path`` into ``model`` (strict, with a clear architecture-mismatch error)."""
    ckpt = read_checkpoint(path, trust=trust)
    key = "state_dict_ema" if use_ema else "state_dict"
    if not isinstance(ckpt.get(key), dict):
        raise NSPluginError(f"checkpoint {path} has no {key!r} entry; drop --use-ema or save with an EMA model")
    return load_into(model, ckpt[key], source=f"checkpoint {path}")
