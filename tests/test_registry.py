"""Registry contract: ns_plugin.register() plugs attacks into torchattacks and checkpoints into timm /
robustbench / EasyRobust conventions, idempotently, with clear errors on clashes."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ns_plugin.errors import NSPluginError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registered():
    import ns_plugin
    return ns_plugin.register()


@pytest.fixture(scope="module")
def small_batch(digits):
    x, y = digits.test.tensors
    return x[:4].clone(), y[:4].clone()


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory):
    from ns_plugin.checkpoint import save_checkpoint
    path = tmp_path_factory.mktemp("ckpt") / "ft.pth"
    save_checkpoint(path, trained[0], meta={"arch": "ns_vit_digits"})
    return path


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_plain_import_has_no_side_effects():
    code = ("import ns_plugin, ns_plugin.integrations, ns_plugin.integrations.timm, ns_plugin.integrations.torchattacks, "
            "ns_plugin.integrations.robustbench, ns_plugin.integrations.easyrobust, ns_plugin.attacks, torchattacks, timm; "
            "assert not hasattr(torchattacks, 'PatchFool'); assert 'PatchFool' not in torchattacks.__all__; "
            "assert not timm.is_model('ns_vit_digits'); print('clean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr[-500:]


def test_register_is_idempotent_and_fills_torchattacks(registered):
    import ns_plugin
    import timm
    import torchattacks
    from ns_plugin._registry import attacks
    names = ["PatchFool", "NullspaceNoise", "TargetedNullspace", "EmbeddingMatch"]
    before = list(torchattacks.__all__)
    again = ns_plugin.register()
    assert again == registered and torchattacks.__all__ == before
    for n in names:
        assert torchattacks.__all__.count(n) == 1 and getattr(torchattacks, n) is attacks.get(n)
    assert torchattacks.DamageNet is attacks.get("DamageNet") and "DamageNet" not in torchattacks.__all__
    assert timm.is_model("ns_vit_digits") and "ns_vit_digits" in timm.list_models(pretrained=True)
    with pytest.raises(NSPluginError, match="did you mean 'PatchFool'"):
        attacks.get("PatchFol")


def test_every_model_only_attack_builds_from_the_model_alone(registered, model, small_batch):
    """What torchattacks' own test loop does over __all__: defaults only, then clean >= robust accuracy."""
    import torchattacks
    x, y = small_batch
    clean = accuracy(model, x, y)
    for name in [n for n in torchattacks.__all__ if n not in torchattacks.__wrapper__]:
        cls = getattr(torchattacks, name)
        if not cls.__module__.startswith("ns_plugin."):
            continue
        torch.manual_seed(0)
        atk = cls(model)  # defaults only
        if hasattr(atk, "steps"):
            atk.steps = 15  # the iterative attacks' full default budgets (250-300 steps) are too slow for a unit test
        adv = atk(x, y)
        assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1, name
        assert clean >= accuracy(model, adv, y), name
        if "targeted" in atk.supported_mode:
            atk.set_mode_targeted_random(quiet=True)
            adv = atk(x, y)
            assert adv.shape == x.shape and clean >= accuracy(model, adv, y), name
        else:
            with pytest.raises(ValueError):
                atk.set_mode_targeted_random(quiet=True)


def test_set_normalization_used_multiattack_and_save_load(registered, model, small_batch, tmp_path):
    import torchattacks
    from ns_plugin.models import unwrap
    x, y = small_batch
    norm, core = unwrap(model)
    for atk, ref in [(torchattacks.TargetedNullspace(core, box="clip"), torchattacks.TargetedNullspace(model, box="clip")),
                     (torchattacks.NullspaceNoise(core, box="shrink"), torchattacks.NullspaceNoise(model, box="shrink"))]:
        atk.set_normalization_used(norm.mean.tolist(), norm.std.tolist())
        assert torch.allclose(atk(norm(x), y), norm(ref(x, y)), atol=1e-4)
    pf = torchattacks.PatchFool(core, steps=3)
    pf.set_normalization_used(norm.mean.tolist(), norm.std.tolist())
    assert pf(norm(x), y).shape == x.shape

    multi = torchattacks.MultiAttack([torchattacks.NullspaceNoise(model), torchattacks.PatchFool(model, steps=10)])
    adv = multi(x, y)
    assert adv.shape == x.shape and accuracy(model, adv, y) <= accuracy(model, x, y)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    atk = torchattacks.NullspaceNoise(model)
    path = tmp_path / "adv.pt"
    atk.save(loader, save_path=str(path), verbose=False)
    (adv_x, adv_y), = list(torchattacks.attack.Attack.load(str(path), batch_size=4))
    assert torch.equal(adv_y, y) and torch.equal(model(adv_x).argmax(1), model(x).argmax(1))


def test_name_clashes_are_errors(registered):
    from ns_plugin.attacks import NullspaceNoise
    from ns_plugin.integrations.torchattacks import register_attack
    with pytest.raises(NSPluginError, match="torchattacks already has 'FGSM'"):
        register_attack("FGSM", NullspaceNoise)
    with pytest.raises(NSPluginError, match="Attack subclass"):
        register_attack("NotAnAttack", dict)
    register_attack("NullspaceNoise", NullspaceNoise)  # the same class again: no-op


def test_ns_vit_digits_is_a_timm_model_with_weights(registered, trained, monkeypatch, tmp_path):
    import timm
    from ns_plugin.checkpoint import save_checkpoint
    from ns_plugin.models import DIGITS_MEAN, DIGITS_STD
    monkeypatch.setenv("NS_PLUGIN_CACHE", str(tmp_path))
    save_checkpoint(tmp_path / "vit_digits_s0_e30.pth", trained[0], meta={"arch": "ns_vit_digits"})
    import ns_plugin
    ns_plugin.register()  # again, with another cache folder: still a no-op
    m = timm.create_model("ns_vit_digits", pretrained=True).eval()
    assert type(m).__name__ == "VisionTransformer"
    sd = trained[0][1].state_dict()
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    assert tuple(m.pretrained_cfg["mean"]) == tuple(DIGITS_MEAN) and tuple(m.pretrained_cfg["std"]) == tuple(DIGITS_STD)
    assert tuple(m.pretrained_cfg["input_size"]) == (3, 32, 32)
    fresh = timm.create_model("ns_vit_digits", num_classes=3)
    assert fresh.head.out_features == 3


def test_ns_vit_digits_never_trains_on_a_registry_call(registered, monkeypatch, tmp_path):
    """An empty cache still gives the weights (shipped in the package); nothing is trained or written."""
    import timm
    monkeypatch.setenv("NS_PLUGIN_CACHE", str(tmp_path / "empty"))
    from ns_plugin.embedded import load_packaged_default
    m = timm.create_model("ns_vit_digits", pretrained=True)    # the packaged weights: nothing trained
    ref = load_packaged_default()[0][1].state_dict()
    assert all(torch.equal(ref[k], v) for k, v in m.state_dict().items())
    assert not (tmp_path / "empty").exists()                    # ... and nothing written


def test_register_checkpoint_timm_easyrobust_and_robustbench(registered, trained, checkpoint, tmp_path, small_batch):
    import timm
    from ns_plugin.models import Normalize
    from ns_plugin.integrations.timm import register_checkpoint, registered_timm_models
    x, y = small_batch
    names = register_checkpoint("ns_test_ft", checkpoint)
    assert names[0] == "ns_test_ft" and "ns_test_ft_imagenet_linf" in names
    assert register_checkpoint("ns_test_ft", checkpoint) == names  # twice: no-op
    ref = trained[0](x)

    # every registered model name builds with timm and loads its weights (robustbench's ImageNet forms put the 10
    # logits at the labels our robustbench folder uses); the other robustbench datasets answer in one line
    from ns_plugin.integrations.robustbench import imagenet_class_index
    index = imagenet_class_index(10)
    for name in names:
        m = timm.create_model(name, pretrained=True).eval()
        out = m(Normalize(m.pretrained_cfg["mean"], m.pretrained_cfg["std"])(x)) if name == "ns_test_ft" else m(x)
        assert torch.allclose(out[:, index] if out.shape[1] == 1000 else out, ref, atol=1e-5), name
    stubs = [n for n in registered_timm_models() if n.startswith("ns_test_ft") and n not in names]
    assert sorted(stubs) == sorted(f"ns_test_ft_{d}_{t}" for d in ("cifar10", "cifar100")
                                   for t in ("linf", "l2", "corruptions"))
    with pytest.raises(NSPluginError, match="not cifar100"):
        timm.create_model("ns_test_ft_cifar100_l2")

    # EasyRobust's benchmarks/benchmark.py: create_model(name, pretrained=False, num_classes=k), then
    # Sequential(Normalize, model).load_state_dict(ckpt['state_dict']) when 0.mean/0.std are present
    bare = timm.create_model("ns_test_ft", pretrained=False, num_classes=10)
    er = torch.nn.Sequential(Normalize([0.0] * 3, [1.0] * 3), bare)
    er.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    assert torch.allclose(er.eval()(x), ref, atol=1e-5)

    # robustbench 1.1.1 load_model finds {name}_{dataset}_{threat} in timm, offline; a k-class checkpoint's
    # logits sit at the ImageNet labels our robustbench folder files its classes under
    from ns_plugin.integrations.robustbench import imagenet_class_index
    from robustbench.utils import load_model
    rb = load_model("ns_test_ft", model_dir=tmp_path, dataset="imagenet", threat_model="Linf",
                    custom_checkpoint=str(checkpoint))
    out = rb(x)
    index = imagenet_class_index(10)
    others = [i for i in range(1000) if i not in index]
    assert out.shape == (4, 1000) and torch.allclose(out[:, index], ref, atol=1e-5)
    assert bool((out[:, others] == -1e4).all())  # classes the checkpoint does not have never win
    rb2 = load_model("ns_test_ft", model_dir=tmp_path, dataset="imagenet", threat_model="corruptions")
    assert torch.allclose(rb2(x)[:, index], ref, atol=1e-5)
    # a dataset it was not registered for: one line naming the fix, not robustbench's bare KeyError
    with pytest.raises(NSPluginError, match="registered for robustbench dataset.s. imagenet, not cifar10"):
        load_model("ns_test_ft", model_dir=tmp_path, dataset="cifar10", threat_model="Linf")


def test_register_checkpoint_errors(registered, trained, checkpoint, tmp_path):
    from ns_plugin.checkpoint import save_checkpoint
    from ns_plugin.integrations.timm import register_checkpoint
    with pytest.raises(NSPluginError, match="timm already has a model named 'vit_base_patch16_224'"):
        register_checkpoint("vit_base_patch16_224", checkpoint, robustbench=())
    other = tmp_path / "other.pth"
    save_checkpoint(other, trained[0], meta={"arch": "ns_vit_digits"})
    register_checkpoint("ns_test_clash", checkpoint, robustbench=())
    with pytest.raises(NSPluginError, match="already registered by ns_plugin"):
        register_checkpoint("ns_test_clash", other, robustbench=())
    with pytest.raises(NSPluginError, match="does not fit"):
        register_checkpoint("ns_test_wrong", checkpoint, arch=dict(img_size=32, patch_size=4, embed_dim=64, depth=4,
                                                                   num_heads=4, num_classes=10), robustbench=())
    nometa = tmp_path / "nometa.pth"
    save_checkpoint(nometa, trained[0])
    with pytest.raises(NSPluginError, match="arch"):
        register_checkpoint("ns_test_nometa", nometa, robustbench=())
    with pytest.raises(NSPluginError, match="does not exist"):
        register_checkpoint("ns_test_missing", tmp_path / "missing.pth")


def test_setup_declares_only_entry_points_something_reads():
    """timm 1.0.9 and torchattacks 3.5.1 read no entry points: none are declared for them (tests/test_plugins.py
    installs a distribution using the ns_plugin.attacks group that ns_plugin.register() reads)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    eps = next(kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
               for kw in node.keywords if kw.arg == "entry_points")
    groups = ast.literal_eval(eps)
    assert set(groups) == {"console_scripts"}
    for entry in groups["console_scripts"]:
        module, attr = entry.split("=")[1].strip().split(":")
        assert callable(getattr(importlib.import_module(module), attr)), entry
