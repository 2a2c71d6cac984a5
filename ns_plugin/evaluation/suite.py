"""The robustness suite: clean accuracy, torchattacks attacks, ImageNet-C corruptions (mCE) and shifts,
evaluated on EasyRobust-layout folders (see :mod:`ns_plugin.evaluation.corruptions`).

Two engines read the same folders and compute the same top-1 accuracy:

* ``"easyrobust"``: EasyRobust's own ``evaluate_imagenet_val/_c/_sketch/_v2/_stylized_imagenet`` (what the
  paper used). Each call builds a 4-worker DataLoader; fine on ImageNet, slow for 75 tiny folders.
* ``"fast"``: ns_plugin's streaming DataLoader on the model's device, sharded over ``torchrun`` ranks with
  exact counts summed; a test checks it agrees with EasyRobust's evaluator.

Both take the test transform; for ImageNet-style folders of variable-size JPEGs it is EasyRobust
``benchmarks/benchmark.py``'s (:func:`ns_plugin.data.eval_transform`: resize by crop percentage, centre crop,
bicubic).

Precision: clean and corruption/shift accuracies run under ``torch.inference_mode()`` in the model's dtype
(fp32 unless the caller casts it); attacks run in fp32 (torchattacks' gradients; no autocast), batch by
batch on the model's device.

The paper's average (arXiv:2403.10476 §5.2, Table 2): the mean over all reported settings, with ImageNet-C entering
as ``100 - mCE``.
"""
from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

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
    "natural-adversarial": ("evaluate_imagenet_val", "A"),   # the digits' ImageNet-A-style set (surrogate_sets)
}




def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _world() -> Tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_ranks(*vals: float, device: torch.device) -> List[float]:
    """Sum per-rank counts over the process group (exact; no average of averages). Identity outside DDP."""
    _, world = _world()
    if world == 1:
        return list(vals)
    import torch.distributed as dist
    t = torch.tensor(vals, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def shard(ds, rank: int, world: int):
    """Rank ``rank``'s share of ``ds`` (items ``rank, rank + world, ...``; no padding, so counts summed over
    ranks are exact, unlike ``DistributedSampler``'s padded shards)."""
    from torch.utils.data import Subset
    return ds if world == 1 else Subset(ds, range(rank, len(ds), world))


def _class_mask(evaluator: str, n_logits: int) -> Optional[List[bool]]:
    """EasyRobust's 200-class masks of ImageNet-A / -R (for 1000-logit models), else None."""
    if n_logits != 1000:
        return None
    if evaluator == "evaluate_imagenet_a":
        from easyrobust.benchmarks.ood.imagenet_a import imagenet_a_mask
        return imagenet_a_mask
    if evaluator == "evaluate_imagenet_r":
        from easyrobust.benchmarks.ood.imagenet_r import imagenet_r_mask
        return imagenet_r_mask
    return None


def loader_counts(model: nn.Module, batches: Iterable, *, evaluator: str = "evaluate_imagenet_val"
                  ) -> Tuple[int, int]:
    """``(correct, seen)`` top-1 over ``(x, y)`` batches, on the model's device, under ``inference_mode``."""
    model.eval()
    dev = model_device(model)
    correct = seen = 0
    mask = None
    with torch.inference_mode():
        for xb, yb in batches:
            out = model(xb.to(dev, non_blocking=True))
            if mask is None:
                m = _class_mask(evaluator, out.shape[1])
                mask = torch.tensor(m, device=dev) if m is not None else False
            if mask is not False:
                out = out[:, mask]
            correct += (out.argmax(1) == yb.to(dev, non_blocking=True)).sum()
            seen += len(yb)
    return int(correct), seen


def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent (:func:`ns_plugin.models.accuracy` x 100, under ``inference_mode``), model left
    in eval mode."""
    from ..models import accuracy
    model.eval()
    with torch.inference_mode():
        return 100.0 * accuracy(model, x, y, batch_size)


def folder_tensors(path) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (in [0, 1]) and labels of a *small* ImageFolder decoded into memory (the digits' per-image results
    for the paired tests); ImageNet-size folders go through :func:`folder_accuracy`'s streaming loader."""
    from ..data import image_folder, tensors
    return tensors(image_folder(path))


def _quiet(fn: Callable, *args, **kw):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kw)


def folder_accuracy(model: nn.Module, path, *, engine: str = "fast", evaluator: str = "evaluate_imagenet_val",
                    batch_size: int = 500, transform=None, workers: int = 0, dataset=None,
                    sharded: bool = True) -> Optional[float]:
    """Top-1 accuracy (%) on an ImageFolder, or ``None`` when the folder does not exist (EasyRobust prints and
    skips; so do we, visibly, in the caller).

    ``transform`` is the test transform (default: none, images must then share one size; use
    :func:`ns_plugin.data.eval_transform`, EasyRobust's benchmark transform, for variable-size images).

    * ``engine="fast"``: ns_plugin's DataLoader (``workers`` decoding processes, pinned memory on CUDA),
      streaming in batches of ``batch_size`` (memory does not grow with the folder), top-1 as EasyRobust
      computes it (A / R logits masked to their 200 classes on 1000-class models). Under ``torchrun``
      with ``sharded`` every rank evaluates its share and the counts are summed (all ranks must call).
      ``dataset`` reuses an already scanned folder (:func:`ns_plugin.data.image_folder`).
    * ``engine="easyrobust"``: EasyRobust's own ``evaluator`` (one process; it makes its own 4-worker
      DataLoader and walks the folder itself).
    """
    path = Path(path)
    if not path.is_dir():
        return None
    if transform is None:
        from ..data import ToFloat
        transform = ToFloat()
    if engine == "easyrobust":
        import easyrobust.benchmarks as eb
        return float(_quiet(getattr(eb, evaluator), model, str(path), test_batchsize=batch_size,
                            test_transform=transform))
    if engine != "fast":
        raise NSPluginError(f"engine must be 'fast' or 'easyrobust', got {engine!r}")
    from ..data import image_folder, make_loader
    ds = dataset if dataset is not None else image_folder(path, transform=transform)
    rank, world = _world() if sharded else (0, 1)
    dev = model_device(model)
    loader = make_loader(shard(ds, rank, world), batch_size, workers=workers, device=dev)
    correct, seen = loader_counts(model, loader, evaluator=evaluator)
    correct, seen = _sum_over_ranks(correct, seen, device=dev) if sharded else (correct, seen)
    return 100.0 * correct / max(1, seen)


def corruption_accuracies(model: nn.Module, c_root, *, engine: str = "fast",
                          corruptions: Iterable[str] = IMAGENET_C, severities: Iterable[int] = (1, 2, 3, 4, 5),
                          **kw) -> Dict[str, Dict[int, float]]:
    """``{corruption: {severity: top-1 %}}`` over ``c_root/<corruption>/<severity>`` (missing folders skipped);
    ``kw`` as :func:`folder_accuracy`."""
    out: Dict[str, Dict[int, float]] = {}
    for c in corruptions:
        for s in severities:
            acc = folder_accuracy(model, Path(c_root) / c / str(s), engine=engine, **kw)
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


def attack_accuracy(model: nn.Module, attack, data, y: Optional[torch.Tensor] = None, *, batch_size: int = 200,
                    sharded: bool = False) -> Tuple[float, float]:
    """Robust top-1 (%) of ``model`` under a torchattacks ``attack`` and the attack's throughput (images/s).

    ``data`` is an image tensor (with labels ``y``, cut into batches of ``batch_size``) or an iterable of
    ``(x, y)`` batches (a DataLoader over the attacked subset, read lazily). Each batch goes to the
    model's device, is attacked there in fp32, and is scored under ``inference_mode``. With ``sharded``
    under ``torchrun`` the per-rank counts are summed (each rank passes its share of the subset)."""
    model.eval()
    dev = model_device(model)
    if isinstance(data, torch.Tensor):
        batches = [(data[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(data), batch_size)]
    else:
        batches = data
    t0 = time.time()
    correct = seen = 0
    for xb, yb in batches:
        xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
        with torch.autocast(dev.type, enabled=False):
            adv = attack(xb, yb)
        if adv.shape != xb.shape or adv.min() < 0 or adv.max() > 1:
            raise NSPluginError(f"attack {type(attack).__name__} returned images outside [0, 1] or of another shape")
        with torch.inference_mode():
            correct += int((model(adv).argmax(1) == yb).sum())
        seen += len(yb)
    secs = time.time() - t0
    if sharded:
        correct, seen, secs = _sum_over_ranks(correct, seen, secs, device=dev)
    return 100.0 * correct / max(1, seen), seen / max(secs, 1e-9)


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
