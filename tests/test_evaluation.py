"""Corruption folders, EasyRobust evaluators and the suite's arithmetic."""
import pytest
import torch

from ns_plugin.errors import NSPluginError


@pytest.fixture(scope="module")
def bench(tmp_path_factory, digits):
    from ns_plugin.evaluation.corruptions import write_benchmark_folders
    x, y = digits.test.tensors
    root = tmp_path_factory.mktemp("b") / "bench"
    return write_benchmark_folders(root, (x[:40], y[:40]), fresh=tuple(t[:30] for t in digits.val.tensors),
                                   corruptions=("gaussian_noise", "glass_blur", "fog", "impulse_noise"),
                                   severities=(1, 5), progress=False)


def test_layout_is_easyrobust(bench):
    for rel in ("imagenet-val", "imagenet-c/glass_blur/5", "imagenet-c/fog/1", "imagenetv2", "imagenet-sketch",
                "rendition", "imagenet-style"):
        assert (bench / rel).is_dir(), rel
        assert len(list((bench / rel).rglob("*.png"))) in (40, 30)
    # 10 classes: no imagenet-r/ (EasyRobust's evaluate_imagenet_r masks 1000 logits and would crash)
    assert not (bench / "imagenet-r").exists()
    note = (bench / "EASYROBUST.txt").read_text()
    assert "--input-size 32 --crop-pct 1.0 --num-classes 10" in note and "rendition/" in note
    assert not [p for p in bench.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_corruptions_change_images_deterministically(digits):
    from ns_plugin.evaluation.corruptions import IMAGENET_C, corrupt
    x = digits.test.tensors[0][:3]
    for name in IMAGENET_C:  # all 15, including the three fixed ones
        a = corrupt(x, name, 5)
        assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1
        assert (a - x).abs().mean() > 0.01, name
        assert torch.equal(a, corrupt(x, name, 5)), name
    mild, severe = corrupt(x, "gaussian_noise", 1), corrupt(x, "gaussian_noise", 5)
    assert (mild - x).abs().mean() < (severe - x).abs().mean()
    with pytest.raises(NSPluginError, match="unknown corruption"):
        corrupt(x, "rain", 1)
    with pytest.raises(NSPluginError, match="severity"):
        corrupt(x, "fog", 6)


def test_fast_engine_agrees_with_easyrobust(model, bench):
    from ns_plugin.evaluation.suite import folder_accuracy
    for rel, ev in (("imagenet-val", "evaluate_imagenet_val"), ("imagenet-c/glass_blur/5", "evaluate_imagenet_val"),
                    ("imagenet-sketch", "evaluate_imagenet_sketch"), ("imagenetv2", "evaluate_imagenet_v2")):
        fast = folder_accuracy(model, bench / rel, engine="fast")
        er = folder_accuracy(model, bench / rel, engine="easyrobust", evaluator=ev)
        assert fast == pytest.approx(er, abs=1e-4), rel
    assert folder_accuracy(model, bench / "imagenet-a") is None


def test_easyrobust_imagenet_c_reads_our_layout(model, bench):
    """EasyRobust's own evaluate_imagenet_c walks <corruption>/<severity>/<class>; on a partial tree it fails
    only for the corruptions we did not write, so check one folder it reads the same way."""
    from ns_plugin.evaluation.suite import corruption_accuracies
    acc = corruption_accuracies(model, bench / "imagenet-c", corruptions=("gaussian_noise", "fog"))
    assert set(acc) == {"gaussian_noise", "fog"} and set(acc["fog"]) == {1, 5}
    assert acc["gaussian_noise"][5] <= acc["gaussian_noise"][1] + 10


def test_mce_and_paper_average():
    from ns_plugin.evaluation.suite import mce, paper_average
    base = {"a": {1: 90.0, 2: 80.0}, "b": {1: 50.0, 2: 50.0}}
    assert mce(base, base) == pytest.approx(100.0)
    better = {"a": {1: 95.0, 2: 90.0}, "b": {1: 75.0, 2: 75.0}}  # errors halved
    assert mce(better, base) == pytest.approx(50.0)
    # the paper's ViT-S row of Table 2 averages to 26.54 with C entering as 100 - mCE
    row = {"Clean": 74.19, "PatchFool": 0.68, "CW": 4.63, "FGSM": 13.79, "DamageNet": 29.82, "A": 16.35,
           "C": 71.13, "V2": 62.51, "R": 34.67, "Sketch": 14.26, "Stylized": 12.15}
    assert paper_average(row, row) == pytest.approx(26.54, abs=0.01)
    with pytest.raises(NSPluginError):
        mce(better, {"z": {1: 1.0}})


def test_attack_accuracy_with_torchattacks(model, digits):
    import torchattacks
    from ns_plugin.evaluation.suite import attack_accuracy, top1
    x, y = digits.test.tensors
    x, y = x[:64], y[:64]
    clean = top1(model, x, y)
    fgsm, ips = attack_accuracy(model, torchattacks.FGSM(model, eps=8 / 255), x, y)
    pgd, _ = attack_accuracy(model, torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10), x, y)
    assert pgd <= fgsm + 1e-9 and fgsm < clean and ips > 0
