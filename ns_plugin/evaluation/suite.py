"""The robustness suite: clean accuracy, torchattacks attacks, ImageNet-C corruptions (mCE) and shifts,
evaluated on EasyRobust-layout folders (see :mod:`ns_plugin.evaluation.corruptions`).

Two engines read the same folders and compute the same top-1 accuracy:

* ``"easyrobust"``: EasyRobust's own ``evaluate_imagenet_val/_c/_sketch/_v2/_stylized_imagenet`` (what the
  paper used). Each call builds a 4-worker DataLoader; fine on ImageNet, slow for 75 tiny folders.
* ``"fast"``: the folder's PNGs are decoded once and kept in memory, then the model runs in batches. Used by
  the demo for the 75 corruption folders; a test checks it agrees with EasyRobust's evaluator.

The paper's average (arXiv:2403.10476 §5.2, Table 2): the mean over all reported settings, with ImageNet-C entering
as ``100 - mCE``.
"""
from __future__ import annotations

import contextlib
import functools
import io
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import NSPluginError
from .corruptions import IMAGENET_C

#: EasyRobust folder -> (EasyRobust evaluator name, column name in the paper's tables)
SHIFT_FOLDERS = {
    "imagenetv2": ("evaluate_imagenet_v2", "V2"),
    "imagenet-r": ("evaluate_imagenet_r", "R"),
    "rendition": ("evaluate_imagenet_val", "R"),   # renditions of non-1000-class data (corruptions.rendition_folder)
    "imagenet-sketch": ("evaluate_imagenet_sketch", "Sketch"),
    "imagenet-style": ("evaluate_stylized_imagenet", "Stylized"),
    "imagenet-a": ("evaluate_imagenet_a", "A"),
}


@functools.lru_cache(maxsize=256)
def _folder_tensors(path: str) -> Tuple[torch.Tensor, torch.Tensor]:
    from ..data import image_folder, tensors
    return tensors(image_folder(path))


def folder_tensors(path) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (in [0, 1]) and labels of an ImageFolder, decoded once per process and cached."""
    return _folder_tensors(str(Path(path).resolve()))


def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent (:func:`ns_plugin.models.accuracy` x 100), model left in eval mode."""
    from ..models import accuracy
    model.eval()
    return 100.0 * accuracy(model, x, y, batch_size)


def _quiet(fn: Callable, *args, **kw):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kw)


def folder_accuracy(model: nn.Module, path, *, engine: str = "fast", evaluator: str = "evaluate_imagenet_val",
                    batch_size: int = 500) -> Optional[float]:
    """Top-1 accuracy (%) on an ImageFolder, with EasyRobust's ``evaluator`` or the in-memory engine.
    ``None`` when the folder does not exist (EasyRobust prints and skips; so do we, visibly, in the caller)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if engine == "fast":
        return top1(model, *folder_tensors(path), batch_size=batch_size)
    if engine != "easyrobust":
        raise NSPluginError(f"engine must be 'fast' or 'easyrobust', got {engine!r}")
    from torchvision import transforms
    import easyrobust.benchmarks as eb
    return float(_quiet(getattr(eb, evaluator), model, str(path), test_batchsize=batch_size,
                        test_transform=transforms.ToTensor()))


def corruption_accuracies(model: nn.Module, c_root, *, engine: str = "fast",
                          corruptions: Iterable[str] = IMAGENET_C) -> Dict[str, Dict[int, float]]:
    """``{corruption: {severity: top-1 %}}`` over ``c_root/<corruption>/<1..5>``."""
    out: Dict[str, Dict[int, float]] = {}
    for c in corruptions:
        for s in range(1, 6):
            acc = folder_accuracy(model, Path(c_root) / c / str(s), engine=engine)
            if acc is not None:
                out.setdefault(c, {})[s] = acc
    return out


def mce(acc: Mapping[str, Mapping[int, float]], baseline: Mapping[str, Mapping[int, float]]) -> float:
    """Mean Corruption Error (Hendrycks & Dietterich 2019) of ``acc`` relative to ``baseline``, in percent:
    ``CE_c = sum_s err_{c,s} / sum_s err^base_{c,s}``, ``mCE = 100 * mean_c CE_c``. The baseline scores 100."""
    ces = []
    for c, sev in acc.items():
        if c not in baseline:
            continue
        e = sum(100 - sev[s] for s in sev)
        eb = sum(100 - baseline[c][s] for s in sev)
        ces.append(e / eb if eb > 0 else float("nan"))
    if not ces:
        raise NSPluginError("no corruption in common with the baseline; cannot compute mCE")
    return 100.0 * sum(ces) / len(ces)


def attack_accuracy(model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 200
                    ) -> Tuple[float, float]:
    """Robust top-1 (%) of ``model`` under a torchattacks ``attack`` and the attack's throughput (images/s)."""
    model.eval()
    t0 = time.time()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        adv = attack(xb, yb)
        if adv.shape != xb.shape or adv.min() < 0 or adv.max() > 1:
            raise NSPluginError(f"attack {type(attack).__name__} returned images outside [0, 1] or of another shape")
        with torch.no_grad():
            correct += (model(adv).argmax(1) == yb).sum().item()
    secs = time.time() - t0
    return 100.0 * correct / max(1, len(y)), len(y) / max(secs, 1e-9)


def paper_average(row: Mapping[str, Optional[float]], columns: Iterable[str]) -> Optional[float]:
    """arXiv:2403.10476 §5.2: average over the given columns that have a value, with ``"C"`` (an mCE, lower is
    better) entering as ``100 - mCE``."""
    vals = []
    for c in columns:
        v = row.get(c)
        if v is None:
            continue
        vals.append(100.0 - v if c == "C" else v)
    return sum(vals) / len(vals) if vals else None


@torch.no_grad()
def correct_mask(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Per-image correctness (bool tensor, same order as ``x``): what paired tests (exact McNemar) need."""
    model.eval()
    dev = next(model.parameters()).device
    out = [model(x[i:i + batch_size].to(dev)).argmax(1).cpu() == y[i:i + batch_size]
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def attack_correct(model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 200
                   ) -> Tuple[torch.Tensor, float]:
    """Per-image robust correctness under a torchattacks ``attack`` (bool tensor) and the attack's images/s."""
    model.eval()
    t0 = time.time()
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        adv = attack(xb, yb)
        if adv.shape != xb.shape or adv.min() < 0 or adv.max() > 1:
            raise NSPluginError(f"attack {type(attack).__name__} returned images outside [0, 1] or of another shape")
        out.append(correct_mask(model, adv, yb))
    return torch.cat(out), len(y) / max(time.time() - t0, 1e-9)
