"""DamageNet-style and ImageNet-A-style sets: made once from a surrogate, read back as folders."""
import json

import pytest
import torch

from ns_plugin.errors import NSPluginError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_damagenet_style_set_is_a_fixed_transfer_folder(model, digits, tmp_path):
    from ns_plugin.evaluation.suite import folder_tensors, top1
    from ns_plugin.evaluation.surrogate_sets import write_damagenet_style
    x, y = digits.test.tensors
    x, y = x[:30], y[:30]
    root = write_damagenet_style(tmp_path / "damagenet", x, y, model, steps=5)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [str(c) for c in range(10)]
    man = json.loads((root / "manifest.json").read_text())
    xs, ys = folder_tensors(root)
    assert len(xs) == 30 and sorted(ys.tolist()) == sorted(y.tolist())
    assert (xs - x[torch.argsort(y, stable=True)]).abs().max() <= 8 / 255 + 1 / 255   # L∞ budget (+ PNG rounding)
    assert man["surrogate_acc_on_set"] < man["surrogate_clean_acc"]
    assert top1(model, xs, ys) == pytest.approx(man["surrogate_acc_on_set"], abs=1e-6)  # PNGs = what was attacked
    with pytest.raises(NSPluginError, match="already exists"):
        write_damagenet_style(root, x, y, model)


def test_imagenet_a_style_set_keeps_only_images_every_surrogate_fails(model, digits, tmp_path):
    import copy
    from ns_plugin.evaluation.suite import folder_tensors
    from ns_plugin.evaluation.surrogate_sets import write_imagenet_a_style
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[1].head.weight.mul_(0.5)
    x, y = digits.test.tensors
    root = write_imagenet_a_style(tmp_path / "imagenet-a", x[:40], y[:40], [model, other], variants=4)
    man = json.loads((root / "manifest.json").read_text())
    assert man["candidates"] == 160 and 0 < man["images"] < 160
    xs, ys = folder_tensors(root)
    assert len(xs) == man["images"]
    with torch.no_grad():
        assert (model(xs).argmax(1) != ys).all() and (other(xs).argmax(1) != ys).all()
