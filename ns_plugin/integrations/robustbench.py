"""robustbench integration: the shims robustbench 1.1.1 needs as it installs from the registry (see README,
"Why the install is unusual"), the timm names its ``load_model`` looks up, and an offline ImageNet-layout
folder its ``benchmark()`` reads.

Each shim is small, names the upstream problem, and does nothing when the problem is absent.
Nothing here runs at ``import ns_plugin``: call :func:`ensure_ecosystem`.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Dict

from ..errors import NSPluginError

#: robustbench threat models a checkpoint is registered for by default (``load_model`` names)
ROBUSTBENCH_THREATS = ("Linf", "L2", "corruptions")

_applied: Dict[str, bool] = {}


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


def ensure_autoattack() -> bool:
    """robustbench 1.1.1 does ``from autoattack import AutoAttack`` and ``from autoattack.state import
    EvaluationState``, but its dependency ``pyautoattack`` installs a module named ``pyautoattack`` whose
    API is keyword-only (``batch_size=``, ``attacks=``) and returns ``(x_adv, y_adv)``.

    When no ``autoattack`` module exists, register one in ``sys.modules`` that adapts pyautoattack to the
    original positional API (``AutoAttack(model, norm, eps, version, ...)``, ``run_standard_evaluation(x, y,
    bs=...)`` returning ``x_adv``). Returns True when the adapter was (or already is) installed.
    """
    if _applied.get("autoattack"):
        return True
    if _has("autoattack"):
        return False  # the real package (fra31/auto-attack) is installed: nothing to do
    if not _has("pyautoattack"):
        raise NSPluginError("robustbench needs AutoAttack but neither 'autoattack' nor 'pyautoattack' is "
                            "installed; run: pip install pyautoattack")
    import pyautoattack
    import pyautoattack.state as aa_state
    from pathlib import Path

    class AutoAttack(pyautoattack.AutoAttack):
        """fra31/auto-attack's signature on top of pyautoattack (installed by ns_plugin.integrations.robustbench)."""

        def __init__(self, model, norm="Linf", eps=0.3, seed=None, verbose=True, attacks_to_run=(),
                     version="standard", is_tf_model=False, device="cuda", log_path=None):
            if is_tf_model:
                raise NSPluginError("the pyautoattack adapter supports PyTorch models only")
            super().__init__(model, attacks=list(attacks_to_run) or None, device=device, eps=eps,
                             norm=norm, seed=seed, version=version)
            self.verbose = verbose

        def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False, state_path=None):
            if state_path is not None:
                state_path = Path(state_path)
            x_adv, y_adv = super().run_standard_evaluation(x_orig, y_orig, batch_size=bs,
                                                           state_path=state_path)
            return (x_adv, y_adv) if return_labels else x_adv

    mod = types.ModuleType("autoattack", AutoAttack.__doc__)
    mod.AutoAttack = AutoAttack
    mod.state = aa_state
    mod.__ns_plugin_shim__ = True
    sys.modules["autoattack"] = mod
    sys.modules["autoattack.state"] = aa_state
    _applied["autoattack"] = True
    return True


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


def ensure_ecosystem() -> Dict[str, bool]:
    """Apply every shim whose problem is present. Returns which ones were active."""
    active = {"autoattack": False}
    if _has("robustbench"):
        check_robustbench()
        ensure_pkg_resources()
        active["autoattack"] = ensure_autoattack()
    return active


class _ImagenetLabelMap:
    """Lifts a k-class model to robustbench's 1000 ImageNet classes (see :func:`robustbench_imagenet_folder`)."""

    def __init__(self, class_index, used):
        self.class_index = list(class_index)  # our class k -> robustbench ImageNet index
        self.used = list(used)  # indices into the x given, in robustbench's loading order

    def wrap(self, model):
        import torch
        from torch import nn

        index = torch.tensor(self.class_index)

        class Lift(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                logits = self.inner(x)
                out = logits.new_full((logits.shape[0], 1000), -1e4)
                return out.index_copy(1, index.to(logits.device), logits[:, :len(index)])

        return Lift(model)


def robustbench_imagenet_folder(data_dir, x, y, num_classes: int):
    """Lay out images so that ``robustbench.benchmark(dataset="imagenet", data_dir=data_dir)`` evaluates
    them offline. Returns ``(n_examples, label_map)``; pass ``label_map.wrap(model)`` as the model.

    robustbench 1.1.1 does not read an arbitrary folder: its ImageNet loader takes the file names listed in
    its ``helper_files/imagenet_test_image_ids.txt`` (``<wnid>/<file>``), in that order, under
    ``data_dir/val``, with labels from the sorted list of the 1,000 wnid folders. We create the 1,000
    folders, give our class ``k`` the wnid of the k-th distinct class in that list, and save one of our
    images of class ``k`` under each listed name, as far as our classes and images allow. The wrapper
    places the model's k logits at those ImageNet indices (other logits at -1e4).
    """
    from pathlib import Path
    from torchvision.utils import save_image

    check_robustbench()
    spec = importlib.util.find_spec("robustbench")
    listing = (Path(spec.origin).parent / "helper_files" / "imagenet_test_image_ids.txt").read_text().split()
    wnids = sorted({line.split("/")[0] for line in listing})
    val = Path(data_dir) / "val"
    for w in wnids:
        (val / w).mkdir(parents=True, exist_ok=True)
    pools = {k: [i for i in range(len(y)) if int(y[i]) == k] for k in range(num_classes)}
    wnid_of_class, used = {}, []
    for line in listing:
        w = line.split("/")[0]
        if w not in wnid_of_class.values():
            if len(wnid_of_class) == num_classes:
                break
            wnid_of_class[len(wnid_of_class)] = w
        k = [c for c, ww in wnid_of_class.items() if ww == w][0]
        if not pools[k]:
            break
        used.append(pools[k].pop(0))
        save_image(x[used[-1]], str(val / line))
    index = [wnids.index(wnid_of_class.get(k, wnids[0])) for k in range(num_classes)]
    return len(used), _ImagenetLabelMap(index, used)
