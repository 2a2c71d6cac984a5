"""robustbench integration: the shims robustbench 1.1.1 needs as it installs from the registry (see README,
"Why the install is unusual"), the timm names its ``load_model`` looks up, and an offline ImageNet-layout
folder its ``benchmark()`` reads.

The fixes are made at install time (``tools/bootstrap.sh``: robustbench re-laid over torchattacks' copy, the
``autoattack`` distribution in ``tools/autoattack_easyrobust``); the checks here only name a missing one.
Nothing here runs at ``import ns_plugin``.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Dict, List

from ..errors import NSPluginError

#: robustbench threat models a checkpoint is registered for by default (``load_model`` names)
ROBUSTBENCH_THREATS = ("Linf", "L2", "corruptions")

def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def robustbench_name(name: str, dataset: str, threat: str) -> str:
    """The timm name robustbench 1.1.1's ``load_model(name, dataset=, threat_model=)`` looks up."""
    return f"{name.lower().replace('-', '_')}_{dataset.lower()}_{threat.lower()}"


def ensure_pkg_resources() -> None:
    """robustbench 1.1.1 (``robustbench/loaders.py``) and easyrobust's CLIP code ``import pkg_resources``,
    which setuptools >= 81 no longer ships. We cannot fake its file lookups safely, so we fail clearly."""
    if not _has("pkg_resources"):
        raise NSPluginError("robustbench needs pkg_resources, which setuptools>=81 removed; "
                            "run: pip install 'setuptools<81'")


def ensure_autoattack() -> str:
    """robustbench 1.1.1 does ``from autoattack import AutoAttack`` and ``from autoattack.state import
    EvaluationState``. fra31/auto-attack is not on PyPI, and robustbench's dependency ``pyautoattack`` installs a
    module named ``pyautoattack``. The install step (``make venv``, or the README's commands) installs
    ``tools/autoattack_easyrobust``, whose ``autoattack`` runs easyrobust's vendored fra31 AutoAttack and adds
    the ``state`` module. This checks it is there (nothing is patched in-process) and returns which code runs."""
    if not _has("autoattack") or not _has("autoattack.state"):
        raise NSPluginError("robustbench needs the 'autoattack' module (with autoattack.state); from the ns_plugin "
                            "checkout run: pip install --no-deps --no-build-isolation ./tools/autoattack_easyrobust")
    import autoattack
    return getattr(autoattack, "SOURCE", f"autoattack from {getattr(autoattack, '__file__', '?')}")


def check_robustbench() -> None:
    """torchattacks 3.5.1's wheel also installs a stripped 2022 top-level ``robustbench`` package; when it
    was installed after the real robustbench 1.1.1, ``robustbench/eval.py`` (``robustbench.benchmark``) is
    missing. Detect that and name the fix."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None:
        raise NSPluginError("robustbench is not installed; run: pip install robustbench==1.1.1")
    from pathlib import Path
    root = Path(spec.origin).parent
    if not (root / "eval.py").is_file():
        raise NSPluginError("the installed robustbench is torchattacks' stripped copy (no robustbench.benchmark); "
                            "run: pip install --no-deps --force-reinstall robustbench==1.1.1")


def import_robustbench():
    """Import the real robustbench 1.1.1 with the shims it needs applied; returns the module."""
    check_robustbench()
    ensure_pkg_resources()
    ensure_autoattack()
    return importlib.import_module("robustbench")


def ensure_ecosystem() -> Dict[str, str]:
    """Check the install-level fixes robustbench needs (see :func:`ensure_autoattack`); changes nothing.
    Returns ``{"autoattack": <which AutoAttack code runs>}`` when robustbench is installed."""
    active: Dict[str, str] = {}
    if _has("robustbench"):
        check_robustbench()
        ensure_pkg_resources()
        active["autoattack"] = ensure_autoattack()
    return active


def _imagenet_listing():
    """robustbench's ImageNet test listing (``<wnid>/<file>`` lines, in its loading order) and the sorted wnids
    (label ``i`` = ``wnids[i]``)."""
    from pathlib import Path
    check_robustbench()
    spec = importlib.util.find_spec("robustbench")
    listing = (Path(spec.origin).parent / "helper_files" / "imagenet_test_image_ids.txt").read_text().split()
    return listing, sorted({line.split("/")[0] for line in listing})


def imagenet_class_index(num_classes: int) -> List[int]:
    """Where a ``num_classes``-class model's logits sit among robustbench's 1000 ImageNet labels: class ``k``
    at the label of the k-th distinct wnid in robustbench's test listing (the identity for 1000 classes).
    :func:`robustbench_imagenet_folder` files class-``k`` images under that wnid, and the robustbench form of a
    registered checkpoint (:func:`ns_plugin.integrations.timm.register_checkpoint`) places its logits there,
    so robustbench's ``benchmark()`` scores it right with no wrapper."""
    k = int(num_classes)
    if k >= 1000:
        return list(range(k))
    listing, wnids = _imagenet_listing()
    order: List[str] = []
    for line in listing:
        w = line.split("/")[0]
        if w not in order:
            order.append(w)
            if len(order) == k:
                break
    return [wnids.index(w) for w in order]


@dataclass
class RobustbenchFolder:
    """What :func:`robustbench_imagenet_folder` wrote: ``n_examples`` to pass to ``benchmark()``, ``used`` (indices
    into the images given, in robustbench's loading order) and ``class_index`` (:func:`imagenet_class_index`)."""
    n_examples: int
    used: List[int]
    class_index: List[int]


def robustbench_imagenet_folder(data_dir, x, y, num_classes: int) -> RobustbenchFolder:
    """Lay out images so that ``robustbench.benchmark(model, dataset="imagenet", data_dir=data_dir,
    n_examples=n_examples)`` evaluates them offline, with ``model = robustbench.utils.load_model(NAME,
    dataset="imagenet")`` for a registered checkpoint (no wrapper).

    robustbench 1.1.1 does not read an arbitrary folder: its ImageNet loader takes the file names listed in
    its ``helper_files/imagenet_test_image_ids.txt`` (``<wnid>/<file>``), in that order, under
    ``data_dir/val``, with labels from the sorted list of the 1,000 wnid folders, and evaluates the first
    ``n_examples``. We create the 1,000 folders and save an image of class ``k`` under each listed name of the
    wnid of class ``k`` (:func:`imagenet_class_index`) until a name of a wnid we have no class (or no image)
    for comes up: about ``num_classes`` images for a small class count (10 for the digits), up to 5,000.
    """
    from pathlib import Path
    from torchvision.utils import save_image

    listing, wnids = _imagenet_listing()
    index = imagenet_class_index(num_classes)
    class_of_wnid = {wnids[i]: k for k, i in enumerate(index)}
    val = Path(data_dir) / "val"
    for w in wnids:
        (val / w).mkdir(parents=True, exist_ok=True)
    pools = {k: [i for i in range(len(y)) if int(y[i]) == k] for k in range(num_classes)}
    used: List[int] = []
    for line in listing:
        k = class_of_wnid.get(line.split("/")[0])
        if k is None or not pools[k]:
            break
        used.append(pools[k].pop(0))
        save_image(x[used[-1]], str(val / line))
    return RobustbenchFolder(len(used), used, index)
