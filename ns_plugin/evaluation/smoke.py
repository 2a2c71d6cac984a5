"""A toy ImageNet-layout folder for the dress rehearsal of a paper-scale comparison (``benchmarks/compare.py
CONFIG --smoke``): the same folder names, class folders named by real ImageNet wnids, JPEGs of many sizes
and aspect ratios (as ImageNet's validation set), ImageNet-C folders of 224x224 JPEGs, and the shift sets.

Images are scikit-learn's digits (shipped with the package, no download), coloured and resized; class
``k`` of the toy set is digit ``k``. Layout (what EasyRobust's ``benchmarks/benchmark.py`` and the harness
read)::

    root/train/<wnid>/*.JPEG                 training images, variable sizes
    root/imagenet-val/<wnid>/*.JPEG          variable sizes (Clean and the attacked subset)
    root/imagenetv2/<wnid>/*.JPEG            a fresh sample, variable sizes
    root/imagenet-c/<corruption>/<s>/<wnid>/*.JPEG   224x224, as the released ImageNet-C
    root/imagenet-sketch/<wnid>/, imagenet-style/<wnid>/     variable sizes
    root/imagenet-a/<wnid>/, imagenet-r/<wnid>/    wnids from EasyRobust's 200-class A / R lists

The wnids of train/val/C/V2/sketch/style are the first ImageNet classes (label ``k`` is logit ``k`` of a
1000-class model); A and R use the first wnids of their 200-class lists, so EasyRobust's A/R masks line up.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NSPluginError

#: Sizes of the variable-size JPEGs (ImageNet's validation images are mostly 500x375 / 375x500 and smaller).
SIZES = ((160, 120), (120, 160), (250, 188), (188, 250), (300, 225), (224, 224), (333, 250), (200, 300))


def imagenet_wnids(k: int, which: str = "all") -> List[str]:
    """The first ``k`` wnids of ImageNet-1k (``which="all"``) or of EasyRobust's ImageNet-A / -R lists, in
    the order of the 1000-class logits."""
    from easyrobust.benchmarks.ood.imagenet_a import all_wnids, imagenet_a_wnids
    from easyrobust.benchmarks.ood.imagenet_r import imagenet_r_wnids

    keep = {"all": None, "a": set(imagenet_a_wnids), "r": set(imagenet_r_wnids)}[which]
    out = [w for w in all_wnids if keep is None or w in keep]
    return out[:k]


def _coloured(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Grey digits (N, 3, h, w) -> coloured digits on a coloured background (still class-recognisable)."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    fg = 0.5 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    bg = 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    return (bg + (fg - bg) * x).clamp(0, 1)


def _resize(x: torch.Tensor, w: int, h: int) -> torch.Tensor:
    return F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp(0, 1)


def _save(img: torch.Tensor, path: Path) -> None:
    from PIL import Image
    arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG", quality=90)


def write_smoke_imagenet(root: os.PathLike | str, *, classes: int = 5, train_per_class: int = 4,
                         val_per_class: int = 2, corruptions: Iterable[str] = ("gaussian_noise", "contrast"),
                         severities: Sequence[int] = (1, 3, 5), seed: int = 0) -> Path:
    """Write the toy ImageNet-layout folder (see the module docstring) into ``root`` atomically (a temporary
    folder renamed at the end); an existing ``root`` is refused. ``classes`` >= 5 because EasyRobust's
    evaluators compute top-5 accuracy."""
    from ..data import load_digits
    from .corruptions import IMAGENET_C, corrupt, rendition, sketch, stylize

    if not 5 <= classes <= 10:
        raise NSPluginError(f"classes must be 5..10 (EasyRobust's evaluators need top-5), got {classes}")
    corruptions = list(corruptions)
    bad = [c for c in corruptions if c not in IMAGENET_C]
    if bad:
        raise NSPluginError(f"unknown corruption {bad[0]!r}; known: {', '.join(IMAGENET_C)}")
    root = Path(root)
    if root.exists():
        raise NSPluginError(f"{root} already exists; remove it or choose another folder")
    s = load_digits(seed=seed, image_size=64)
    pools = {}
    for split, ds in (("train", s.train), ("eval", s.test), ("fresh", s.val)):
        x, y = ds.tensors
        pools[split] = [x[y == k] for k in range(classes)]
    wn = {"all": imagenet_wnids(classes), "a": imagenet_wnids(classes, "a"), "r": imagenet_wnids(classes, "r")}
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    rng = np.random.default_rng(seed)
    try:
        def write_set(rel: str, split: str, per_class: int, kind: str = "clean", names: str = "all",
                      fixed: Optional[int] = None) -> None:
            for k in range(classes):
                src = pools[split][k]
                if len(src) < per_class:
                    raise NSPluginError(f"digit {k} has only {len(src)} {split} images; ask for fewer per class")
                x = _coloured(src[:per_class], seed + 17 * k + len(rel))
                for i, img in enumerate(x):
                    w, h = (fixed, fixed) if fixed else SIZES[int(rng.integers(len(SIZES)))]
                    img = _resize(img, w, h)
                    if kind == "sketch":
                        img = sketch(img[None])[0]
                    elif kind == "rendition":
                        img = rendition(img[None], seed=seed + i)[0]
                    elif kind == "style":
                        img = stylize(img[None], seed=seed + i)[0]
                    elif kind.startswith("c:"):
                        c, sev = kind[2:].rsplit(":", 1)
                        img = corrupt(img[None], c, int(sev), seed=seed + i)[0]
                    _save(img, tmp / rel / wn[names][k] / f"{split}_{k}_{i:04d}.JPEG")

        write_set("train", "train", train_per_class)
        write_set("imagenet-val", "eval", val_per_class)
        write_set("imagenetv2", "fresh", val_per_class)
        write_set("imagenet-sketch", "eval", val_per_class, "sketch")
        write_set("imagenet-style", "eval", val_per_class, "style")
        write_set("imagenet-r", "eval", val_per_class, "rendition", names="r")
        write_set("imagenet-a", "eval", val_per_class, names="a")
        for c in corruptions:
            for sev in severities:
                write_set(f"imagenet-c/{c}/{sev}", "eval", val_per_class, f"c:{c}:{sev}", fixed=224)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


#: Sizes of the dress rehearsal: ``full`` (``benchmarks/compare.py CONFIG --smoke``) runs every row; ``quick``
#: (``--smoke quick``, what the test suite runs) the baseline, the first fine-tuned row and the first DAT-family
#: row if there is one, on fewer images.
SMOKE_SIZES = {
    "full": dict(train_per_class=4, val_per_class=2, corruptions=("gaussian_noise", "contrast"), severities=(1, 3),
                 rounds=2, steps=2, noise_steps=4, attack_steps=2, n_attack=4, rows=None),
    "quick": dict(train_per_class=2, val_per_class=1, corruptions=("contrast",), severities=(2,),
                  rounds=1, steps=1, noise_steps=2, attack_steps=1, n_attack=2, rows=2),
}


def smoke_data(size: str = "full", *, cache: Optional[os.PathLike] = None, timeout: float = 900.0) -> Path:
    """The toy ImageNet-layout folder for ``size``, written once into the cache (``NS_PLUGIN_CACHE``).
    Under ``torchrun`` rank 0 writes it and the other ranks wait (at most ``timeout`` seconds) for the atomic
    rename that makes it appear complete."""
    import time
    from ..embedded import cache_dir
    sz = SMOKE_SIZES[size]
    root = Path(cache) if cache else cache_dir() / "smoke" / f"imagenet_{size}_v1"
    if root.is_dir():
        return root
    if int(os.environ.get("RANK", "0")) == 0:
        write_smoke_imagenet(root, train_per_class=sz["train_per_class"], val_per_class=sz["val_per_class"],
                             corruptions=sz["corruptions"], severities=sz["severities"])
        return root
    t0 = time.time()
    while not root.is_dir():
        if time.time() - t0 > timeout:
            raise NSPluginError(f"rank {os.environ.get('RANK')} waited {timeout:.0f} s for rank 0 to write {root}")
        time.sleep(0.5)
    return root


def smoke_config(cfg: dict, data_root: os.PathLike, size: str = "full"):
    """The comparison config ``cfg`` (a paper config) at toy size, for a dress rehearsal of the real run: the
    same architecture at its input size, the same rows (methods, ε, EMA, the AMP flag), tables, evaluation
    engine and columns, on the toy folder ``data_root``; tiny rounds, batches, searches and attacks. What
    cannot run offline is swapped for a stand-in and listed under ``smoke_substitutions``: pretrained weights
    (random init), the pretrained VQGAN (``small_f8``, the same factor 8), DamageNet and AutoAttack (skipped).
    Returns ``(config, substitutions)``."""
    import copy
    if size not in SMOKE_SIZES:
        raise NSPluginError(f"smoke size must be one of {', '.join(SMOKE_SIZES)}, got {size!r}")
    sz = SMOKE_SIZES[size]
    c = copy.deepcopy(cfg)
    subs: List[str] = []
    c["name"] = f"{cfg['name']}_smoke_{size}"
    if c.get("seeds") and len(c["seeds"]) > 1:   # one seed: the rehearsal checks code paths, not statistics
        subs.append(f"seeds {c['seeds']} -> [{c['seeds'][0]}]")
        c["seeds"] = c["seeds"][:1]
    c["data"] = str(data_root)
    tr = c.setdefault("training", {})
    if tr.get("pretrained"):
        subs.append("pretrained weights -> random init (no network)")
    tr.update(pretrained=False, rounds=sz["rounds"], steps_per_round=sz["steps"], batch_size=2, search_batch_size=2,
              noise_max_steps=sz["noise_steps"], pgd_steps=sz["attack_steps"], dat_steps=1, probe=False,
              plot=size == "full", progress=False, workers=0 if size == "quick" else 1)
    tr.pop("world_size", None)
    from ..data import scan_folder
    k = len(scan_folder(Path(data_root) / "train")[0])
    if tr.get("num_classes") != k:   # a new head, as when fine-tuning an ImageNet model on a k-class folder
        subs.append(f"classifier head -> {k} classes (the toy folder's)")
        tr["num_classes"] = k
    runs = c["runs"]
    if sz["rows"]:   # quick: the baseline, the first fine-tuned row, and the first DAT-family row (VQGAN at 224)
        trained = [r for r in runs[1:] if r.get("method")]
        dat = [r for r in trained if str(r.get("method")).startswith("dat")]
        keep = [runs[0]] + trained[:1] + [r for r in dat[:1] if r not in trained[:1]]
        runs = [r for r in runs if any(r is k for k in keep)]
    for r in [tr] + runs:
        if r.get("vqgan") not in (None, "small", "small_f8"):
            subs.append(f"vqgan {r['vqgan']} -> small_f8 (random, factor 8)")
            r["vqgan"] = "small_f8"
        if r.get("pretrained"):
            r["pretrained"] = False
        if r.get("init"):   # a checkpoint path / URL of the real run: not here, random init instead
            subs.append(f"init {r['init']} -> random init")
            r["init"] = None
    if any((r.get("method") or "").startswith("dat") for r in runs) and tr.get("vqgan", "small") == "small":
        tr["vqgan"] = "small_f8"
    c["runs"] = runs
    names = {r["name"] for r in runs}
    tabs = {}
    for t, rows in (c.get("tables") or {}).items():
        if t == "table4":
            kept = [row for row in rows if all(n in names for n in row[1:])]
        else:
            kept = [n for n in rows if n in names]
        if kept:
            tabs[t] = kept
    c["tables"] = tabs
    ev = c.setdefault("eval", {})
    if ev.get("damagenet"):
        subs.append("damagenet folder -> skipped")
    n = sz["attack_steps"]
    ev.update(n_attack=sz["n_attack"], corruptions=list(sz["corruptions"]), severities=list(sz["severities"]),
              damagenet=None, batch_size=4, attack_batch_size=2, workers=0 if size == "quick" else 1,
              attack_seed=0 if ev.get("attack_seed") is None else ev["attack_seed"])
    ev["pgd"] = dict(ev.get("pgd") or {}, steps=n)
    ev["cw"] = dict(ev.get("cw") or {}, steps=n)
    ev["patchfool"] = dict(ev.get("patchfool") or {}, steps=n)
    if ev.get("autoattack"):
        ev["autoattack"] = None
        subs.append("autoattack -> skipped (minutes per image at 224 on a CPU)")
    return c, sorted(set(subs))
