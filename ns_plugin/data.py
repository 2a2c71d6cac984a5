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
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1).repeat(1, 3, 1, 1).contiguous()
    y = torch.tensor(raw.target, dtype=torch.long)
    idx = list(range(len(y)))
    rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=raw.target)
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction), random_state=seed,
                                  stratify=raw.target[rest])
    sel = lambda ids: TensorDataset(x[sorted(ids)], y[sorted(ids)])  # noqa: E731
    return Splits(sel(train), sel(val), sel(test), [str(i) for i in range(10)])


def tensors(ds: Dataset, limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack a (small) dataset into ``(x, y)`` tensors, optionally the first ``limit`` items."""
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors[0], ds.tensors[1]
        return (x[:limit], y[:limit]) if limit else (x, y)
    n = len(ds) if limit is None else min(limit, len(ds))
    items = [ds[i] for i in range(n)]
    return torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items])


class _CheckedLoader:
    """PIL loader that turns unreadable files into one clear error."""

    def __call__(self, path: str):
        from PIL import Image, UnidentifiedImageError
        try:
            with open(path, "rb") as f:
                return Image.open(f).convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise NSPluginError(f"cannot read image {path}: {e.__class__.__name__}; "
                                f"remove or replace the file") from None


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
    if transform is None:
        steps = []
        if image_size is not None and resize:
            steps += [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
        steps.append(transforms.ToTensor())
        transform = transforms.Compose(steps)
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
