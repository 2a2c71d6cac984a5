"""Safe checkpoint I/O shared by every part of ns_plugin.

Format (EasyRobust's ``benchmarks/benchmark.py`` reads it as is)::

    {"state_dict": {"0.mean", "0.std", "1.<timm keys>"...},
     "state_dict_ema": {...} or absent,
     "meta": {plain str/int/float/bool/list/dict: architecture, method, metrics...}}

Everything in it loads with ``torch.load(weights_only=True)``. Writes are atomic (temp file + rename).
"""
from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from .errors import NSPluginError, one_line

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
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``
    (:func:`ns_plugin.io.atomic_write`)."""
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
    if path.is_dir():
        raise NSPluginError(f"checkpoint {path} is a folder, not a file; pass the .pth file inside it")
    if not path.is_file():
        raise NSPluginError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise NSPluginError(f"checkpoint {path} is empty (0 bytes); it was not written completely, re-create it")
    try:
        # timm's / EasyRobust's CheckpointSaver stores the training flags as an argparse.Namespace: plain data
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        if not trust:
            raise NSPluginError(f"checkpoint {path} contains pickled Python objects that weights_only loading "
                                f"refuses; re-save it as a state dict, or pass trust=True (--trust-checkpoint) "
                                f"if you trust its source") from None
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e2:  # noqa: BLE001 - unpickling arbitrary files raises anything
            raise NSPluginError(f"checkpoint {path} is not a readable torch file ({one_line(e2)})") from None
    except PermissionError:
        raise NSPluginError(f"checkpoint {path} is not readable (permission denied)") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises EOFError/KeyError/RuntimeError... on junk
        raise NSPluginError(f"checkpoint {path} is not a readable torch file ({one_line(e)}); it may be "
                            f"truncated or not a checkpoint at all") from None
    if isinstance(ckpt, nn.Module):  # only reachable with trust=True
        ckpt = ckpt.state_dict()
    if not isinstance(ckpt, dict) or not ckpt:
        what = "an empty dict" if isinstance(ckpt, dict) else "a " + type(ckpt).__name__
        raise NSPluginError(f"checkpoint {path} holds {what}, not a state dict")
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
    if not isinstance(out.get("meta", {}), dict):
        out["meta"] = {}
    out.setdefault("meta", {})
    for key in ("state_dict", "state_dict_ema"):
        if isinstance(out.get(key), dict):
            check_finite(out[key], f"checkpoint {path}" + (" (EMA weights)" if key == "state_dict_ema" else ""))
    return out


def check_finite(state_dict: Dict[str, Any], source: str = "checkpoint") -> None:
    """Refuse weights holding NaN or infinity (a diverged or corrupted model) in one line."""
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NSPluginError(f"{source} holds NaN or infinite weights in {len(bad)} tensor(s), e.g. {bad[0]}; "
                            f"the model diverged or the file is corrupt; use another checkpoint")


def load_into(model: nn.Module, state_dict: Dict[str, torch.Tensor], *, source: str = "checkpoint") -> nn.Module:
    """``model.load_state_dict`` with one clear error when the checkpoint is for another architecture."""
    own = model.state_dict()
    if not isinstance(state_dict, dict):
        raise NSPluginError(f"{source} holds no state dict (a {type(state_dict).__name__})")
    not_t = [k for k in own if k in state_dict and not isinstance(state_dict[k], torch.Tensor)]
    if not_t:
        raise NSPluginError(f"{source} is not a weights file: entry {not_t[0]!r} is a "
                            f"{type(state_dict[not_t[0]]).__name__}, not a tensor")
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
