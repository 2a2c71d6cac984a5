"""Data: the embedded default (scikit-learn's digits as 3x32x32 images in [0, 1]) and ImageNet-style
folders, with the checks a user needs before a long job starts."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

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
    """ImageFolder loader: :func:`read_image` as a 3-channel float tensor in [0, 1]."""

    def __call__(self, path: str) -> torch.Tensor:
        return read_image(path, "image", channels=3)


def image_folder(root: os.PathLike | str, image_size: Optional[int] = None, *, resize: bool = True,
                 transform=None):
    """An ImageNet-style folder ``root/<class>/<image>`` as a torchvision ``ImageFolder`` of tensors in [0, 1].

    With ``image_size`` the images are resized (shorter side) and centre-cropped to it when ``resize`` is
    true; with ``resize=False`` an image of another size is an error. Missing/empty folders and non-image
    files are reported in one line before any work starts.
    """
    from torchvision import datasets, transforms

    root = Path(root)
    if not root.exists():
        raise NSPluginError(f"data folder {root} does not exist; pass an ImageNet-style folder root/<class>/<image>")
    if not root.is_dir():
        raise NSPluginError(f"data folder {root} is a file, not a folder; pass root/<class>/<image>")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise NSPluginError(f"data folder {root} has no class sub-folders; lay it out as root/<class>/<image>")
    bad, n_images = [], 0
    for d in class_dirs:
        for f in d.rglob("*"):
            if f.is_file() and not f.name.startswith("."):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    n_images += 1
                else:
                    bad.append(f)
    if bad:
        raise NSPluginError(f"data folder {root} holds {len(bad)} non-image file(s), e.g. {bad[0]}; "
                            f"remove them (accepted: {', '.join(IMAGE_EXTENSIONS)})")
    if n_images == 0:
        raise NSPluginError(f"data folder {root} has class folders but no images; put images in root/<class>/")
    if transform is None:  # the loader gives float tensors in [0, 1] (read_image), not PIL images
        steps = []
        if image_size is not None and resize:
            steps += [transforms.Resize(image_size, antialias=True), transforms.CenterCrop(image_size)]
        transform = transforms.Compose(steps) if steps else None
    ds = datasets.ImageFolder(str(root), transform=transform, loader=_CheckedLoader(),
                              allow_empty=True)
    if image_size is not None and not resize:
        x, _ = ds[0]
        if tuple(x.shape[-2:]) != (image_size, image_size):
            raise NSPluginError(f"images in {root} are {x.shape[-1]}x{x.shape[-2]} but the model expects "
                                f"{image_size}x{image_size}; resize them or allow resizing")
    return ds


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
