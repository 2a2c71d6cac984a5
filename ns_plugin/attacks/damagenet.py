import os
from pathlib import Path

import torch

from ..data import IMAGE_EXTENSIONS
from ..errors import NSPluginError
from ._base import NSAttack



def _read_labels_file(root: Path, labels_file: Path):
    samples = []
    for i, line in enumerate(labels_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 2:
            raise NSPluginError(f"{labels_file}:{i}: expected '<image file> <label>', got {line!r}")
        name, label = parts
        try:
            label = int(label)
        except ValueError:
            raise NSPluginError(f"{labels_file}:{i}: label {label!r} is not an integer class index") from None
        path = root / name
        if not path.is_file():
            raise NSPluginError(f"{labels_file}:{i}: image {path} does not exist")
        samples.append((path, label))
    if not samples:
        raise NSPluginError(f"labels file {labels_file} lists no images")
    return samples


def _read_image_folder(root: Path):
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    numeric = bool(classes) and all(c.isdigit() for c in classes)
    samples = []
    for k, c in enumerate(classes):
        label = int(c) if numeric else k  # numbered folders keep their number even when some are absent
        for f in sorted((root / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append((f, label))
    if not samples:
        raise NSPluginError(f"adversarial set folder {root} has no images; lay it out as root/<class>/<image> "
                            f"(ImageFolder) or root/<image> with a labels file of '<image> <label>' lines")
    return samples


class DamageNet(NSAttack):
    r"""
    A pre-generated adversarial set (such as DAmageNet: Chen et al., 'Universal Adversarial Attack on
    Attention and the Resulting Dataset DAmageNet', TPAMI 2020 [https://arxiv.org/abs/1904.03405]) exposed as a
    torchattacks attack, for harnesses that expect one: ``atk(images, labels)`` returns the stored
    adversarial images for that batch instead of computing them.

    Layout: an ImageFolder ``root/<class>/<image>`` (labels = index of the class folder in sorted order, as
    torchvision's ImageFolder; with all 1,000 ImageNet wnid folders that is the ImageNet class index; folders
    named by numbers ``0, 1, ...`` keep their number, even when some are absent), or images with a labels file of
    ``<image file> <label>`` lines (``labels_file=``, or ``root/labels.txt`` when present). The stored images
    are matched to the clean batches either by position — consecutive calls return consecutive stored images,
    so iterate the clean data in the same order (``reset()`` rewinds) — or explicitly with
    ``atk(images, labels, indices=idx)``. With ``check_labels`` (default) a batch whose labels differ from the
    stored ones is an error (the two data sets are out of step).

    Distance Measure : whatever generated the set (unknown here)

    Arguments:
        model (nn.Module): the model (only used for its device and input size).
        root (str or None): folder of the adversarial set; None: ``$NS_PLUGIN_DAMAGENET``. (Default: None)
        labels_file (str or None): labels file (see above). (Default: None)
        image_size (int or None): resize (shorter side) and centre-crop stored images to this size; None: they
            must already have the size of the clean images. (Default: None)
        check_labels (bool): refuse batches whose labels differ from the stored labels. (Default: True)

    Shape:
        - images: :math:`(N, C, H, W)` clean images in [0, 1] (used for the size/device and to count N).
        - labels: :math:`(N)` class indices (checked against the stored labels) or None.
        - output: :math:`(N, C, H, W)`.

    Examples::
        >>> attack = torchattacks.DamageNet(model, root="DAmageNet/")
        >>> for images, labels in clean_loader:        # same order as the adversarial set
        ...     adv_images = attack(images, labels)

    """

    def __init__(self, model, root=None, labels_file=None, image_size=None, check_labels=True):
        super().__init__("DamageNet", model)
        root = root if root is not None else os.environ.get("NS_PLUGIN_DAMAGENET")
        if not root:
            raise NSPluginError("DamageNet needs the folder of the adversarial set: pass root=... or set "
                                "$NS_PLUGIN_DAMAGENET")
        root = Path(root)
        if not root.is_dir():
            raise NSPluginError(f"adversarial set folder {root} does not exist (or is not a folder)")
        if labels_file is None and (root / "labels.txt").is_file():
            labels_file = root / "labels.txt"
        self.root = str(root)
        self.samples = _read_labels_file(root, Path(labels_file)) if labels_file else _read_image_folder(root)
        self.labels_file = None if labels_file is None else str(labels_file)
        self.image_size = image_size
        self.check_labels = bool(check_labels)
        self.position = 0
        self.supported_mode = ["default"]

    def __len__(self):
        return len(self.samples)

    def reset(self):
        """Rewind: the next call returns the first stored images again."""
        self.position = 0

    def load(self, index: int) -> torch.Tensor:
        """The stored adversarial image ``index`` as a (C, H, W) tensor in [0, 1]."""
        from PIL import Image
        from torchvision.transforms import functional as TF
        path, _ = self.samples[index]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if self.image_size is not None:
                    im = TF.center_crop(TF.resize(im, self.image_size), self.image_size)
                return TF.to_tensor(im)
        except OSError as e:
            raise NSPluginError(f"cannot read adversarial image {path}: {e}") from None

    def forward(self, images, labels=None, indices=None):
        r"""
        Overridden.
        """
        images = self._check_inputs(images)
        n = len(images)
        labels = self._check_labels(labels, n, required=False)
        if indices is None:
            if self.position + n > len(self.samples):
                raise NSPluginError(f"the adversarial set in {self.root} has {len(self.samples)} images; a batch of {n} "
                                    f"at position {self.position} runs past its end (call reset() to rewind, or "
                                    f"pass indices=)")
            idx = list(range(self.position, self.position + n))
        else:
            idx = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
            if len(idx) != n:
                raise NSPluginError(f"got {len(idx)} indices for {n} images")
            bad = [i for i in idx if not 0 <= i < len(self.samples)]
            if bad:
                raise NSPluginError(f"index {bad[0]} is out of range for an adversarial set of {len(self.samples)} images")
        adv = torch.stack([self.load(i) for i in idx]) if idx else images.new_zeros((0, *images.shape[1:]))
        if adv.shape[1:] != images.shape[1:]:
            raise NSPluginError(f"stored adversarial images have shape {tuple(adv.shape[1:])} but the clean images have "
                                f"{tuple(images.shape[1:])}; pass image_size= to resize them or use matching data")
        stored = torch.tensor([self.samples[i][1] for i in idx], dtype=torch.long)
        if labels is not None and self.check_labels and not torch.equal(stored, labels.cpu()):
            k = int((stored != labels.cpu()).nonzero()[0])
            raise NSPluginError(f"labels differ from the adversarial set's at its image {idx[k]} "
                                f"({int(labels[k])} vs stored {int(stored[k])}): the clean data and {self.root} are out "
                                f"of step; iterate them in the same order or pass indices=")
        if indices is None:
            self.position += n
        self._set_info({"indices": idx, "labels": stored})
        return adv.to(images.device, images.dtype)
