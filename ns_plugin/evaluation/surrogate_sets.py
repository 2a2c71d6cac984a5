"""DamageNet-style and ImageNet-A-style sets for the embedded default, made with independent surrogate models.

The paper ("Approximate Nullspace Augmented Finetuning for Robust Vision Transformers", Tables 2-4) reports
two columns that have no digits counterpart: DamageNet and ImageNet-A. Both are *fixed* image sets made with
models other than the one evaluated, and are rebuilt here the same way, at digits scale:

* **DamageNet-style** (Chen et al., "Universal Adversarial Attack on Attention and the Resulting Dataset
  DAmageNet", TPAMI 2020): adversarial examples generated **once** on a surrogate and then loaded as a folder,
  so every evaluated model faces the same transferred perturbations. Here: the test split attacked by L∞ PGD
  (ε 8/255, step 1/255, 20 steps, random start, seeded) on a surrogate tiny ViT trained independently (its own
  init and data order: ``train_default_model(seed=1)``), written as 8-bit PNGs to ``damagenet/<class>/``.
* **ImageNet-A-style** (Hendrycks et al., "Natural Adversarial Examples", CVPR 2021): natural images kept only
  when independent models misclassify them (ImageNet-A filtered against ResNet-50s). Here: 8 random natural
  shifts (rotation ±25°, translation ±12%, scale 0.8-1.2, shear ±10°, brightness/contrast ±20%) of every
  held-out test image, kept when **every** surrogate (tiny ViTs trained with seeds 1 and 2) gets it wrong,
  written to ``natural-adversarial/<class>/`` (all ten class folders, some may hold few images). Not
  ``imagenet-a/``: EasyRobust's ``benchmark.py`` evaluates that folder with ``evaluate_imagenet_a``, which keeps
  200 of 1000 ImageNet logits and fails for a 10-class model (renditions go to ``rendition/`` for the same
  reason); ``benchmark.py`` skips this folder, ns_plugin reads it for the A column.

Neither set involves the evaluated models, so the columns are transfer/hard-example accuracies, not white-box
ones. ``manifest.json`` in each folder records how it was made (surrogates, their test accuracy, attack or
filter settings, counts). Surrogates are trained here (cached), so the sets are reproducible on one machine
but, like any training run, not bit-identical across machines.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import NSPluginError
#: the folder of the ImageNet-A-style set (see the module docstring for why it is not ``imagenet-a``)
A_STYLE_FOLDER = "natural-adversarial"


SURROGATE_SEEDS = (1, 2)
DAMAGENET = dict(eps=8 / 255, alpha=1 / 255, steps=20, seed=0)
NATURAL_A = dict(variants=8, degrees=25.0, translate=0.12, scale=(0.8, 1.2), shear=10.0, jitter=0.2, seed=0)


def surrogate_models(seeds: Sequence[int] = SURROGATE_SEEDS, *, epochs: int = 30, progress: bool = False
                     ) -> List[Tuple[nn.Module, Dict[str, float]]]:
    """Independently trained tiny ViTs (``default_model(seed=s, source="train")``, cached), one per seed.
    Seed 0 is refused: it is the evaluated base model's recipe."""
    from ..embedded import default_model
    if 0 in seeds:
        raise NSPluginError("surrogate seed 0 is the evaluated default model's recipe; use other seeds")
    return [default_model(seed=s, epochs=epochs, progress=progress, source="train") for s in seeds]


def _write_pngs(root: Path, x: torch.Tensor, y: torch.Tensor, n_classes: int) -> None:
    from PIL import Image
    import numpy as np
    for c in range(n_classes):
        (root / str(c)).mkdir(parents=True, exist_ok=True)     # every class folder: labels stay class indices
    arr = (x.permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    for i, lab in enumerate(y.tolist()):
        Image.fromarray(arr[i]).save(root / str(lab) / f"{i:05d}.png")


def _finish(tmp: Path, final: Path, manifest: Dict[str, object]) -> Path:
    from ..io import atomic_write_text
    atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, final)
    return final


def _fresh_tmp(final: Path) -> Path:
    import tempfile
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def _accuracy(model, x, y) -> float:
    from .suite import top1
    return top1(model, x, y)


def write_damagenet_style(root, x: torch.Tensor, y: torch.Tensor, surrogate: nn.Module, *,
                          surrogate_info: Optional[Dict[str, object]] = None, eps: float = DAMAGENET["eps"],
                          alpha: float = DAMAGENET["alpha"], steps: int = DAMAGENET["steps"],
                          seed: int = DAMAGENET["seed"], n_classes: int = 10) -> Path:
    """Attack ``x`` once with L∞ PGD on ``surrogate`` and write the images as ``root/<class>/<i>.png``
    (atomically: the folder appears complete or not at all). Returns ``root``."""
    import torchattacks
    root = Path(root)
    if root.exists():
        raise NSPluginError(f"{root} already exists; remove it to rebuild the set")
    tmp = _fresh_tmp(root)
    try:
        surrogate.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adv = torch.cat([torchattacks.PGD(surrogate, eps=eps, alpha=alpha, steps=steps, random_start=True)(
                x[i:i + 200], y[i:i + 200]) for i in range(0, len(x), 200)])
        adv = (adv * 255).round() / 255                           # what the PNGs hold
        _write_pngs(tmp, adv, y, n_classes)
        manifest = {"kind": "DamageNet-style transfer set", "images": int(len(x)), "source": "digits test split",
                    "attack": {"name": "PGD Linf", "eps": eps, "alpha": alpha, "steps": steps, "random_start": True,
                               "seed": seed},
                    "surrogate": surrogate_info or {}, "surrogate_clean_acc": _accuracy(surrogate, x, y),
                    "surrogate_acc_on_set": _accuracy(surrogate, adv, y)}
        return _finish(tmp, root, manifest)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def natural_shifts(x: torch.Tensor, *, variants: int = NATURAL_A["variants"], degrees: float = NATURAL_A["degrees"],
                   translate: float = NATURAL_A["translate"], scale=NATURAL_A["scale"], shear: float = NATURAL_A["shear"],
                   jitter: float = NATURAL_A["jitter"], seed: int = NATURAL_A["seed"]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``variants`` random natural shifts of every image (affine + brightness/contrast), seeded. Returns the
    images ``(variants * N, C, H, W)`` and the index of the source image of each."""
    from torchvision.transforms import v2
    aff = v2.RandomAffine(degrees=degrees, translate=(translate, translate), scale=tuple(scale), shear=shear)
    col = v2.ColorJitter(brightness=jitter, contrast=jitter)
    out, src = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(variants):
            for i in range(len(x)):
                out.append(col(aff(x[i])).clamp(0, 1))
                src.append(i)
    return torch.stack(out), torch.tensor(src)


@torch.no_grad()
def write_imagenet_a_style(root, x: torch.Tensor, y: torch.Tensor, surrogates: Sequence[nn.Module], *,
                           surrogate_info: Optional[List[Dict[str, object]]] = None, n_classes: int = 10,
                           **shift_kw) -> Path:
    """Shift ``x`` naturally (:func:`natural_shifts`), keep the images that *every* surrogate misclassifies,
    write them as ``root/<class>/<i>.png`` (atomically). Returns ``root``."""
    root = Path(root)
    if root.exists():
        raise NSPluginError(f"{root} already exists; remove it to rebuild the set")
    if not surrogates:
        raise NSPluginError("ImageNet-A-style filtering needs at least one surrogate model")
    tmp = _fresh_tmp(root)
    try:
        xs, src = natural_shifts(x, **shift_kw)
        xs = (xs * 255).round() / 255
        ys = y[src]
        wrong = torch.ones(len(xs), dtype=torch.bool)
        for m in surrogates:
            m.eval()
            pred = torch.cat([m(xs[i:i + 500]).argmax(1) for i in range(0, len(xs), 500)])
            wrong &= pred != ys
        keep = wrong.nonzero().reshape(-1)
        _write_pngs(tmp, xs[keep], ys[keep], n_classes)
        per_class = torch.bincount(ys[keep], minlength=n_classes).tolist()
        manifest = {"kind": "ImageNet-A-style filtered set", "candidates": int(len(xs)), "images": int(len(keep)),
                    "per_class": per_class, "source": "digits test split, naturally shifted",
                    "shifts": {k: (list(v) if isinstance(v, tuple) else v) for k, v in {**NATURAL_A, **shift_kw}.items()},
                    "filter": "kept when every surrogate misclassifies the image",
                    "surrogates": surrogate_info or []}
        return _finish(tmp, root, manifest)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_surrogate_sets(root, test: Sequence[torch.Tensor], *, seeds: Sequence[int] = SURROGATE_SEEDS,
                          epochs: int = 30, progress: bool = False) -> Dict[str, Path]:
    """``root/damagenet`` and ``root/natural-adversarial`` (:data:`A_STYLE_FOLDER`) for the embedded default,
    built once (cached) from the test split ``(x, y)`` and surrogates trained with ``seeds``. Returns the two
    folders."""
    root = Path(root)
    x, y = test
    out = {"damagenet": root / "damagenet", A_STYLE_FOLDER: root / A_STYLE_FOLDER}
    if all(p.is_dir() for p in out.values()):
        return out
    models = surrogate_models(seeds, epochs=epochs, progress=progress)
    info = [{"recipe": f"ns_plugin.embedded.train_default_model(seed={s}, epochs={epochs})",
             "test_acc": round(100 * float(m[1].get("test_acc", float("nan"))), 2)} for s, m in zip(seeds, models)]
    if not out["damagenet"].is_dir():
        write_damagenet_style(out["damagenet"], x, y, models[0][0], surrogate_info=info[0])
    if not out[A_STYLE_FOLDER].is_dir():
        write_imagenet_a_style(out[A_STYLE_FOLDER], x, y, [m for m, _ in models], surrogate_info=info)
    return out
