"""ImageNet-C-style corruptions and distribution shifts for small images, written in EasyRobust's layout.

Corruptions come from the ``imagecorruptions`` package (Hendrycks & Dietterich's ImageNet-C code), with two
upstream breakages fixed locally (only inside that module's namespace, only when present):

* ``glass_blur``/``gaussian_blur`` call ``skimage.filters.gaussian(..., multichannel=True)``; scikit-image
  >= 0.19 renamed the argument to ``channel_axis`` and 0.25 removed it.
* ``fog`` uses ``np.float_``, removed in NumPy 2.

and one reproducibility fix: ``impulse_noise`` calls ``skimage.util.random_noise`` without a seed (a fresh
``default_rng()`` each call); ours passes a seed drawn from NumPy's global RNG, which :func:`corrupt` seeds.

Layout written by :func:`write_benchmark_folders` (what EasyRobust's ``evaluate_*`` functions read)::

    root/imagenet-val/<class>/*.png
    root/imagenet-c/<corruption>/<1..5>/<class>/*.png      (the 15 ImageNet-C corruptions)
    root/imagenetv2/<class>/*.png        a fresh sample of the same distribution (the held-out val split)
    root/imagenet-sketch/<class>/*.png   edge sketches (dark strokes on white)
    root/imagenet-r/<class>/*.png        renditions: colour-inverted, randomly tinted (1000 classes only)
    root/rendition/<class>/*.png         the same renditions for any other number of classes
    root/imagenet-style/<class>/*.png    texture "stylisation": random smooth colour textures
    root/EASYROBUST.txt                  the benchmark.py command line that reads these folders right

EasyRobust's ``evaluate_imagenet_r`` keeps 200 of 1,000 ImageNet logits (``imagenet_r_mask``), so it fails on
a model with fewer classes: for such data the renditions go to ``rendition/``, which benchmark.py does not
read (evaluate it with ``evaluate_imagenet_val``; our suite does). Images are stored at the model's input
size, so benchmark.py needs ``--input-size <size> --crop-pct 1.0`` (its default 0.875 resizes 32 px images to
36 and crops the border: 75% instead of 100% on the same images was measured).
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
import types
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch

from ..errors import NSPluginError

#: The 15 ImageNet-C corruptions EasyRobust's ``evaluate_imagenet_c`` reads, in its folder names.
IMAGENET_C = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
              "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
              "jpeg_compression")
#: Shift folders we synthesise (EasyRobust folder name -> description).
SHIFTS = {"imagenetv2": "fresh sample (held-out split)", "imagenet-sketch": "edge sketches",
          "imagenet-r": "renditions (inverted, tinted)", "imagenet-style": "random colour textures"}
#: Where the renditions go for data without ImageNet's 1000 classes (see the module docstring).
RENDITION_FOLDER_SMALL = "rendition"


def rendition_folder(num_classes: int) -> str:
    """``imagenet-r`` for 1000-class data (EasyRobust's evaluator masks 1000 logits), else ``rendition``."""
    return "imagenet-r" if int(num_classes) == 1000 else RENDITION_FOLDER_SMALL


def easyrobust_command(data_dir, image_size: int, num_classes: int, model: str = "MODEL",
                       ckpt_path: str = "CHECKPOINT") -> str:
    """The ``benchmarks/benchmark.py`` command line that evaluates a checkpoint on our folders as laid out."""
    return (f"python benchmarks/benchmark.py --model {model} --ckpt_path {ckpt_path} --data_dir {data_dir} "
            f"--input-size {int(image_size)} --crop-pct 1.0 --num-classes {int(num_classes)}")


class _NumpyWithFloat(types.ModuleType):
    """numpy, plus the ``float_`` alias NumPy 2 removed (for imagecorruptions' ``fog``)."""

    def __getattr__(self, name):
        return np.float64 if name == "float_" else getattr(np, name)


@functools.lru_cache(maxsize=1)
def _imagecorruptions():
    """imagecorruptions' corruption module with the two local fixes applied when needed."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import imagecorruptions.corruptions as C
    import inspect
    from skimage.filters import gaussian as _gaussian
    if "multichannel" not in inspect.signature(_gaussian).parameters:
        def gaussian(image, *args, multichannel=None, **kw):
            if multichannel:
                kw.setdefault("channel_axis", -1)
            return _gaussian(image, *args, **kw)
        C.gaussian = gaussian
    if not hasattr(np, "float_"):
        C.np = _NumpyWithFloat("numpy")
    import skimage
    from skimage.util import random_noise

    def seeded_random_noise(image, *args, **kw):
        kw.setdefault("rng", int(np.random.randint(2 ** 31 - 1)))
        return random_noise(image, *args, **kw)
    C.sk = types.SimpleNamespace(util=types.SimpleNamespace(random_noise=seeded_random_noise), color=skimage.color)
    return C


def corrupt(x: torch.Tensor, name: str, severity: int, *, seed: int = 0) -> torch.Tensor:
    """Apply ImageNet-C corruption ``name`` at ``severity`` (1-5) to images ``(N, 3, H, W)`` in [0, 1].

    Deterministic for a given ``seed`` (imagecorruptions draws from NumPy's global RNG; its state is
    saved and restored around the call).
    """
    _imagecorruptions()
    from imagecorruptions import corrupt as _corrupt
    if name not in IMAGENET_C + ("speckle_noise", "gaussian_blur", "spatter", "saturate"):
        raise NSPluginError(f"unknown corruption {name!r}; known: {', '.join(IMAGENET_C)}")
    if severity not in (1, 2, 3, 4, 5):
        raise NSPluginError(f"severity must be 1..5, got {severity}")
    state = np.random.get_state()
    np.random.seed(seed * 1000 + severity * 37 + IMAGENET_C.index(name) if name in IMAGENET_C else seed)
    try:
        out = []
        for img in x:
            arr = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            res = np.asarray(_corrupt(arr, corruption_name=name, severity=severity), dtype=np.float64)
            if res.shape != arr.shape:  # some corruptions return (H, W) for grey input or resize
                res = res.reshape(arr.shape[0], arr.shape[1], -1)[..., :3]
            out.append(torch.from_numpy(np.clip(res, 0, 255).astype(np.uint8)).permute(2, 0, 1))
    finally:
        np.random.set_state(state)
    return torch.stack(out).float() / 255.0


def sketch(x: torch.Tensor) -> torch.Tensor:
    """Edge sketch: Sobel magnitude of the grey image, as dark strokes on white, 3 channels."""
    import torch.nn.functional as F
    g = x.mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    ex, ey = F.conv2d(g, kx, padding=1), F.conv2d(g, kx.transpose(2, 3), padding=1)
    mag = (ex ** 2 + ey ** 2).sqrt()
    mag = mag / mag.flatten(1).max(1).values.clamp_min(1e-6).view(-1, 1, 1, 1)
    return (1 - mag).clamp(0, 1).repeat(1, 3, 1, 1)


def rendition(x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Rendition: colour-inverted image with a random per-image tint."""
    g = torch.Generator().manual_seed(seed)
    tint = 0.4 + 0.6 * torch.rand(x.shape[0], 3, 1, 1, generator=g)
    return ((1 - x) * tint).clamp(0, 1)


def stylize(x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Texture stylisation: the image's luminance modulates a random smooth colour texture."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    tex = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    tex2 = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    lum = x.mean(1, keepdim=True)
    return (lum * tex + (1 - lum) * 0.6 * tex2).clamp(0, 1)


def _make(kind: str, x: torch.Tensor, arg, seed: int) -> torch.Tensor:
    if kind == "clean":
        return x
    if kind == "corrupt":
        return corrupt(x, arg[0], arg[1], seed=seed)
    return {"sketch": lambda: sketch(x), "rendition": lambda: rendition(x, seed=seed),
            "style": lambda: stylize(x, seed=seed)}[kind]()


def _write_job(job) -> str:
    from PIL import Image
    rel, kind, arg, x, y, names, out, seed = job
    torch.set_num_threads(1)
    imgs = _make(kind, x, arg, seed)
    arr = (imgs.permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    for i, lab in enumerate(y.tolist()):
        d = Path(out) / rel / names[lab]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr[i]).save(d / f"{i:05d}.png", compress_level=1)
    return rel


def write_benchmark_folders(root: os.PathLike | str, test: Sequence[torch.Tensor], *,
                            fresh: Optional[Sequence[torch.Tensor]] = None, classes: Optional[List[str]] = None,
                            corruptions: Iterable[str] = IMAGENET_C, severities: Iterable[int] = (1, 2, 3, 4, 5),
                            seed: int = 0, workers: int = 2, progress: bool = True) -> Path:
    """Write the clean test set, its 15 corruptions x 5 severities and the shift sets as EasyRobust folders.

    ``test`` and ``fresh`` are ``(x, y)`` pairs of images in [0, 1]; ``fresh`` (another sample of the same
    distribution) becomes ``imagenetv2``. Images are stored as 8-bit PNGs. The tree is written into a temporary
    folder (``workers`` processes) and renamed into place at the end, so an interrupted run leaves nothing
    behind. An existing ``root`` is refused. About 40 s for 360 32x32 images on 2 cores (glass blur dominates).
    """
    import concurrent.futures as cf
    import multiprocessing as mp
    from tqdm.auto import tqdm

    root = Path(root)
    if root.exists():
        raise NSPluginError(f"{root} already exists; remove it or choose another folder")
    x, y = test
    n_cls = int(max(y.max(), fresh[1].max() if fresh is not None else 0)) + 1
    names = list(classes) if classes else [f"{k:04d}" for k in range(n_cls)]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    jobs = [("imagenet-val", "clean", None, x, y)]
    jobs += [(f"imagenet-c/{c}/{s}", "corrupt", (c, s), x, y) for c in corruptions for s in severities]
    if fresh is not None:
        jobs.append(("imagenetv2", "clean", None, fresh[0], fresh[1]))
    jobs += [("imagenet-sketch", "sketch", None, x, y), (rendition_folder(n_cls), "rendition", None, x, y),
             ("imagenet-style", "style", None, x, y)]
    jobs = [j + (names, str(tmp), seed) for j in jobs]
    # slowest first (glass blur, frost) so the pool stays busy
    jobs.sort(key=lambda j: -(("glass" in j[0]) * 10 + ("frost" in j[0]) * 5 + ("zoom" in j[0]) * 2))
    try:
        bar = tqdm(total=len(jobs), desc="write benchmark folders", disable=not progress)
        if workers > 1:
            with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                for _ in pool.map(_write_job, jobs):
                    bar.update()
        else:
            for j in jobs:
                _write_job(j)
                bar.update()
        bar.close()
        note = (f"EasyRobust-layout benchmark folders: {x.shape[0]} test images, {n_cls} classes, "
                f"{x.shape[-1]}x{x.shape[-2]} pixels.\n\nEvaluate a checkpoint with EasyRobust's benchmarks/benchmark.py "
                f"(under `ns-plugin run --checkpoint NAME=PATH --` for an ns_plugin model name):\n\n  "
                f"{easyrobust_command(root, x.shape[-1], n_cls, 'NAME', 'PATH')}\n\n--crop-pct 1.0: the images are "
                f"stored at the input size (the default 0.875 resizes and crops their border).\n")
        if n_cls != 1000:
            note += (f"Renditions are in {RENDITION_FOLDER_SMALL}/, not imagenet-r/: EasyRobust's evaluate_imagenet_r "
                     f"keeps 200 of 1000 ImageNet logits and fails for {n_cls} classes; evaluate the folder with "
                     f"evaluate_imagenet_val. Likewise an ImageNet-A-style set (ns_plugin.evaluation.surrogate_sets) "
                     f"goes to natural-adversarial/, not imagenet-a/ (evaluate_imagenet_a masks the same way); "
                     f"benchmark.py skips both folders, ns_plugin reads them for the R and A columns.\n")
        (tmp / "EASYROBUST.txt").write_text(note)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
