"""Data: the embedded default (scikit-learn's digits as 3x32x32 images in [0, 1]) and ImageNet-style
folders, with the checks a user needs before a long job starts."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .errors import NSPluginError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Splits:
    """Train/val/test ``TensorDataset`` s of ``(image in [0,1], label)`` plus the class names."""
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    classes: List[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_digits(seed: int = 0, image_size: int = 32, val_fraction: float = 0.1,
                test_fraction: float = 0.2) -> Splits:
    """scikit-learn's 8x8 digits (1,797 real images, 10 classes, shipped inside the package, no download)
    upsampled bilinearly to ``3 x image_size x image_size`` in [0, 1].

    The split is stratified and fixed by ``seed`` (default 0: 1,257 train / 180 val / 360 test).
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise NSPluginError("val_fraction and test_fraction must be in (0, 1) and sum to less than 1")
    raw = _load()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(raw.target, dtype=torch.long)
    idx = list(range(len(y)))
    rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=raw.target)
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction), random_state=seed,
                                  stratify=raw.target[rest])

    def sel(ids) -> TensorDataset:  # upsampled split by split: one copy of the images at a model's size (224)
        up = F.interpolate(x[sorted(ids)], size=(image_size, image_size), mode="bilinear", align_corners=False)
        return TensorDataset(up.clamp_(0, 1).repeat(1, 3, 1, 1), y[sorted(ids)])
    return Splits(sel(train), sel(val), sel(test), [str(i) for i in range(10)])


def tensors(ds: Dataset, limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack a (small) dataset into ``(x, y)`` tensors, optionally the first ``limit`` items."""
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors[0], ds.tensors[1]
        return (x[:limit], y[:limit]) if limit else (x, y)
    n = len(ds) if limit is None else min(limit, len(ds))
    items = [ds[i] for i in range(n)]
    return torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items])


def read_image(path: os.PathLike | str, what: str = "image", *, channels: Optional[int] = None) -> torch.Tensor:
    """Read an image file as a float ``(C, H, W)`` tensor in [0, 1]: the one image reader of ns_plugin.

    Conversions (each checked here): 8-bit images are divided by 255 and **16-bit** ones (PIL modes ``I;16*``,
    and ``I`` with values in 0..65535) by 65535 (PIL's own ``convert("RGB")`` would saturate them); palette
    images are expanded to their colours; transparency (``RGBA``, ``LA``, palette with transparency) is
    composited on white; CMYK/YCbCr/LAB/HSV are converted to RGB; 1-bit images become grey; float images
    (mode ``F``) must already lie in [0, 1]. Anything else is refused in one line. Grey images keep one
    channel unless ``channels=3`` (repeated) is asked for; ``channels=1`` averages colour images.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise NSPluginError(f"{what} {str(path)!r} is a folder, not an image file")
    if not path.is_file():
        raise NSPluginError(f"{what} file {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode.startswith("I;16"):
                arr = np.asarray(im).astype(np.float32) / 65535.0
            elif mode == "I":
                raw = np.asarray(im)
                if raw.size and (raw.min() < 0 or raw.max() > 65535):
                    raise NSPluginError(f"{what} {str(path)!r} holds 32-bit integer pixels outside 0..65535; "
                                        f"convert it to an 8- or 16-bit image")
                arr = raw.astype(np.float32) / 65535.0
            elif mode == "F":
                arr = np.asarray(im).astype(np.float32)
                if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1):
                    raise NSPluginError(f"{what} {str(path)!r} holds float pixels outside [0, 1]; "
                                        f"save it as an 8- or 16-bit image")
            else:
                if mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif mode == "PA":
                    im = im.convert("RGBA")
                elif mode == "1":
                    im = im.convert("L")
                if im.mode in ("RGBA", "LA", "RGBa", "La"):
                    grey = im.mode in ("LA", "La")
                    rgba = im.convert("RGBA")
                    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, rgba).convert("L" if grey else "RGB")
                elif im.mode not in ("L", "RGB"):
                    im = im.convert("RGB")
                arr = np.asarray(im, dtype=np.float32) / 255.0
    except NSPluginError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise NSPluginError(f"cannot read {what} {str(path)!r} as an image ({e.__class__.__name__}); "
                            f"remove or replace the file") from None
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()
    if channels == 3 and t.shape[0] == 1:
        t = t.expand(3, -1, -1).contiguous()
    elif channels == 1 and t.shape[0] == 3:
        t = t.mean(0, keepdim=True)
    return t


class _CheckedLoader:
    """ImageFolder loader: :func:`read_image` as a 3-channel float tensor in [0, 1]. With ``pil=True``, plain
    8-bit RGB / grey images (JPEGs, ordinary PNGs) come back as the PIL RGB image EasyRobust's and torchvision's
    ``ImageFolder`` read, so PIL transforms (bicubic resize) give exactly EasyRobust's tensors; every other kind
    (16-bit, palette, transparency, ...) still goes through :func:`read_image`. Finish transforms with
    :class:`ToFloat`."""

    def __init__(self, pil: bool = False):
        self.pil = pil

    def __call__(self, path: str):
        if self.pil:
            from PIL import Image
            try:
                with Image.open(path) as im:
                    if im.mode in ("RGB", "L"):
                        im.load()
                        return im.convert("RGB")
            except Exception:  # noqa: BLE001 (read_image reports unreadable files in one line)
                pass
        return read_image(path, "image", channels=3)


def scan_folder(root: os.PathLike | str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """One walk of an ImageNet-style folder ``root/<class>/<image>``: ``(classes, [(path, label), ...])``.

    Missing/empty folders and non-image files are reported in one line (:class:`NSPluginError`) from the same
    walk that lists the images, so a folder is read once however it is used afterwards."""
    root = Path(root)
    if not root.exists():
        raise NSPluginError(f"data folder {root} does not exist; pass an ImageNet-style folder root/<class>/<image>")
    if not root.is_dir():
        raise NSPluginError(f"data folder {root} is a file, not a folder; pass root/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise NSPluginError(f"data folder {root} has no class sub-folders; lay it out as root/<class>/<image>")
    samples: List[Tuple[str, int]] = []
    bad: List[str] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, files in os.walk(root / name, followlinks=True):
            dirnames.sort()
            for f in sorted(files):
                if f.startswith("."):
                    continue
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), label))
                else:
                    bad.append(os.path.join(dirpath, f))
    if bad:
        raise NSPluginError(f"data folder {root} holds {len(bad)} non-image file(s), e.g. {bad[0]}; "
                            f"remove them (accepted: {', '.join(IMAGE_EXTENSIONS)})")
    if not samples:
        raise NSPluginError(f"data folder {root} has class folders but no images; put images in root/<class>/")
    return classes, samples


def _scanned_image_folder(root, classes, samples, transform):
    """A torchvision ``ImageFolder`` built from a :func:`scan_folder` result (no second walk of the tree)."""
    from torchvision import datasets

    class _Scanned(datasets.ImageFolder):
        def find_classes(self, directory):
            return list(classes), {c: i for i, c in enumerate(classes)}

        def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            return list(samples)

    return _Scanned(str(root), transform=transform, loader=_CheckedLoader(pil=True), allow_empty=True)


class ToFloat:
    """The last step of every folder transform: a PIL image (what EasyRobust's ``ImageFolder`` reads) through
    ``ToTensor``, a float tensor from :func:`read_image` unchanged. So one transform serves ns_plugin's
    loader and EasyRobust's evaluators alike."""

    def __call__(self, img):
        if isinstance(img, torch.Tensor):
            return img
        from torchvision.transforms import functional as TF
        return TF.to_tensor(img)

    def __repr__(self):
        return "ToFloat()"


#: EasyRobust ``benchmarks/benchmark.py`` defaults: ``--crop-pct 0.875``, ``--interpolation 3`` (bicubic).
EVAL_CROP_PCT = 0.875


def eval_transform(input_size: int, crop_pct: float = EVAL_CROP_PCT):
    """EasyRobust ``benchmarks/benchmark.py``'s test transform: resize the shorter side to
    ``int(input_size / crop_pct)`` (bicubic), centre-crop ``input_size``, ``ToTensor`` (images in [0, 1];
    normalisation lives in the model). ``crop_pct=1`` resizes straight to ``input_size``."""
    from torchvision import transforms

    if not (isinstance(input_size, int) and input_size > 0):
        raise NSPluginError(f"input_size must be a positive integer, got {input_size!r}")
    if not (isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1):
        raise NSPluginError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    bicubic = transforms.InterpolationMode.BICUBIC
    return transforms.Compose([transforms.Resize(int(input_size / crop_pct), interpolation=bicubic, antialias=True),
                               transforms.CenterCrop(input_size), ToFloat()])


def train_transform(input_size: int, augment: bool = True, crop_pct: float = EVAL_CROP_PCT):
    """The usual ImageNet training augmentation (timm / EasyRobust): ``RandomResizedCrop(input_size,
    scale=(0.08, 1), bicubic)`` + horizontal flip, images in [0, 1]. ``augment=False``: :func:`eval_transform`."""
    from torchvision import transforms

    if not augment:
        return eval_transform(input_size, crop_pct)
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.RandomHorizontalFlip(), ToFloat()])


def image_folder(root: os.PathLike | str, image_size: Optional[int] = None, *, resize: bool = True,
                 transform=None, crop_pct: float = 1.0):
    """An ImageNet-style folder ``root/<class>/<image>`` as a torchvision ``ImageFolder`` of tensors in [0, 1].

    The tree is walked once (:func:`scan_folder`). With ``image_size`` the images go through
    :func:`eval_transform` (``crop_pct`` 1: shorter side to ``image_size``, centre crop; EasyRobust's
    benchmark uses 0.875) when ``resize`` is true; with ``resize=False`` an image of another size is an
    error. Images of different sizes need ``image_size`` (or a ``transform``) before they can be batched.
    """
    classes, samples = scan_folder(root)
    if transform is None:
        if image_size is not None and resize:
            transform = eval_transform(image_size, crop_pct)
        else:
            transform = ToFloat()
    ds = _scanned_image_folder(root, classes, samples, transform)
    if image_size is not None and not resize:
        x, _ = ds[0]
        if tuple(x.shape[-2:]) != (image_size, image_size):
            raise NSPluginError(f"images in {root} are {x.shape[-1]}x{x.shape[-2]} but the model expects "
                                f"{image_size}x{image_size}; resize them or allow resizing")
    return ds


def subset_indices(n: int, k: Optional[int], seed: Optional[int] = 0) -> List[int]:
    """A fixed index list of ``min(k, n)`` items out of ``n`` (sorted), as robustbench fixes its 5,000
    ImageNet images by a list of ids: the first ``k`` of a permutation seeded by ``seed``, or the first
    ``k`` items when ``seed`` is ``None``. ``k=None``: all ``n``. Only indices; images are read lazily."""
    k = n if k is None else min(int(k), n)
    if seed is None:
        return list(range(k))
    g = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def make_loader(ds: Dataset, batch_size: int, *, workers: int = 0, device=None, shuffle: bool = False,
                generator=None, sampler=None, batch_sampler=None, drop_last: bool = False, persistent: bool = False):
    """A ``DataLoader`` with the usual throughput settings: ``workers`` decoding processes, pinned memory
    when the batches go to a CUDA device (so ``.to(device, non_blocking=True)`` overlaps the copy), a
    prefetch of 2 batches per worker."""
    from torch.utils.data import DataLoader

    steady_host_memory()
    pin = torch.device(device).type == "cuda" if device is not None else False
    kw: Dict[str, Any] = dict(num_workers=int(workers), pin_memory=pin)
    if workers:
        kw.update(persistent_workers=persistent, prefetch_factor=2)
    if batch_sampler is not None:
        return DataLoader(ds, batch_sampler=batch_sampler, **kw)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, sampler=sampler,
                      drop_last=drop_last, **kw)


_MMAP_FIXED: List[bool] = []


def steady_host_memory(threshold: int = 128 * 1024) -> None:
    """Keep glibc from hoarding the memory of freed batches (Linux/glibc; a no-op elsewhere; once per process).

    Batches of images decoded at different sizes allocate and free large blocks. glibc raises its mmap
    threshold each time such a block is freed, after which large blocks come from the heap and are not returned
    to the OS: the peak RSS of a folder evaluation then grew with the number of images (measured with
    ``benchmarks/eval_memory.py``: +562 MB from 400 to 3,200 JPEGs). A fixed threshold (``mallopt
    M_MMAP_THRESHOLD``, which also turns the dynamic adjustment off, as ``MALLOC_MMAP_THRESHOLD_`` would) keeps
    it flat (813.4 MB at 200 images, 813.9 MB at 1,600). Called when the first DataLoader is made, so forked
    decoding workers inherit it; importing ns_plugin changes nothing."""
    if _MMAP_FIXED:
        return
    _MMAP_FIXED.append(True)
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, int(threshold))   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def default_workers() -> int:
    """Decoding processes for folder loaders: ``NS_PLUGIN_WORKERS`` if set, else min(8, CPUs - 1)."""
    env = os.environ.get("NS_PLUGIN_WORKERS")
    if env is not None:
        try:
            return max(0, int(env))
        except ValueError:
            raise NSPluginError(f"NS_PLUGIN_WORKERS must be an integer, got {env!r}") from None
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def save_image_folder(root: os.PathLike | str, x: torch.Tensor, y: torch.Tensor,
                      classes: Optional[List[str]] = None) -> Path:
    """Write images in [0, 1] as PNGs into ``root/<class>/<index>.png`` (the layout EasyRobust's and
    robustbench's ImageNet evaluators read). Written into a temporary folder and renamed at the end, so an
    interrupted write leaves nothing behind."""
    import shutil
    import tempfile
    from torchvision.utils import save_image

    root = Path(root)
    if root.exists():
        raise NSPluginError(f"{root} already exists; remove it or choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for i, (img, label) in enumerate(zip(x, y.tolist())):
            name = classes[label] if classes else f"{label:04d}"
            (tmp / name).mkdir(exist_ok=True)
            save_image(img, tmp / name / f"{i:05d}.png")
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
