"""Foundation: ecosystem co-install, embedded default, checkpoints, bad input."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ns_plugin.errors import NSPluginError


def test_ecosystem_imports_in_one_process():
    from ns_plugin.integrations import robustbench as compat
    compat.ensure_ecosystem()
    import easyrobust.benchmarks
    from easyrobust.attacks import pgd_generator
    import torchattacks
    import robustbench
    import robustbench.utils
    import timm

    assert callable(pgd_generator) and callable(easyrobust.benchmarks.evaluate_imagenet_val)
    assert timm.__version__.startswith("1.0.")
    assert hasattr(torchattacks, "PGD") and "PGD" in torchattacks.__all__
    # the real robustbench 1.1.1, not torchattacks' stripped copy
    assert robustbench.benchmark.__module__ == "robustbench.eval"
    assert "custom_checkpoint" in robustbench.utils.load_model.__code__.co_varnames


def test_autoattack_is_installed_not_patched():
    import sys
    from ns_plugin.integrations import robustbench as compat
    source = compat.ensure_autoattack()
    import autoattack
    from autoattack.state import EvaluationState  # noqa: F401
    assert "easyrobust" in source and autoattack.__file__.endswith("autoattack/__init__.py")
    assert not getattr(autoattack, "__ns_plugin_shim__", False) and "pyautoattack" not in sys.modules


def test_robustbench_benchmark_on_our_folder_with_load_model(trained, digits, tmp_path):
    """robustbench's own load_model + benchmark on the ImageNet layout we write: the right clean accuracy with no
    wrapper, and AutoAttack (easyrobust's vendored fra31 code) runs."""
    from torchvision import transforms
    from ns_plugin.checkpoint import save_checkpoint
    from ns_plugin.integrations import robustbench as compat
    from ns_plugin.integrations.timm import register_checkpoint
    from ns_plugin.models import accuracy
    import robustbench
    from robustbench.utils import load_model
    model, _ = trained
    ck = tmp_path / "ck.pth"
    save_checkpoint(ck, model, meta={"arch": "ns_vit_digits"})
    register_checkpoint("ns_found_rb", ck)
    x, y = digits.test.tensors
    folder = compat.robustbench_imagenet_folder(tmp_path / "data", x, y, num_classes=10)
    assert folder.n_examples >= 8
    rb_model = load_model("ns_found_rb", dataset="imagenet", threat_model="Linf")
    clean, robust = robustbench.benchmark(rb_model, n_examples=folder.n_examples, dataset="imagenet",
                                          threat_model="Linf", data_dir=str(tmp_path / "data"),
                                          device=torch.device("cpu"), batch_size=folder.n_examples, eps=4 / 255,
                                          preprocessing=transforms.ToTensor())
    # the images robustbench read are ours: its clean accuracy equals ours on the same images (PNG stores
    # 8-bit pixels, so allow one image of difference)
    ours = accuracy(model, x[folder.used], y[folder.used])
    assert ours > 0.5 and abs(clean - ours) <= 1 / folder.n_examples + 1e-9
    assert 0.0 <= robust <= clean


def test_digits_split_is_fixed_and_in_range(digits):
    from ns_plugin.data import load_digits
    again = load_digits(seed=0)
    x, y = digits.train.tensors
    assert x.shape[1:] == (3, 32, 32) and x.min() >= 0 and x.max() <= 1
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert torch.equal(x, again.train.tensors[0]) and torch.equal(digits.test.tensors[1], again.test.tensors[1])
    other = load_digits(seed=1)
    assert not torch.equal(other.test.tensors[0], digits.test.tensors[0])


def test_default_model_trains_reproducibly_to_90(trained, digits):
    from ns_plugin.embedded import train_default_model
    model, metrics = trained
    assert metrics["test_acc"] >= 0.90
    short1, _ = train_default_model(digits, epochs=1, progress=False)
    short2, _ = train_default_model(digits, epochs=1, progress=False)
    for a, b in zip(short1.state_dict().values(), short2.state_dict().values()):
        assert torch.equal(a, b)


def test_packaged_default_is_verified_and_reproduces_its_metrics(digits, tmp_path, monkeypatch):
    """The default model ships as safetensors with its SHA-256 recorded; a changed file is refused."""
    import hashlib

    import ns_plugin.embedded as emb
    from ns_plugin.errors import NSPluginError
    path = emb.packaged_weights_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == emb.PACKAGED_SHA256
    model, metrics = emb.default_model(progress=False)
    assert emb.accuracy(model, *digits.test.tensors) == pytest.approx(metrics["test_acc"], abs=1e-6)
    bad = tmp_path / path.name
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1                                     # one bit of one weight
    bad.write_bytes(bytes(blob))
    monkeypatch.setattr(emb, "packaged_weights_path", lambda: bad)
    with pytest.raises(NSPluginError, match="SHA-256 .* expected"):
        emb.default_model(progress=False)
    with pytest.raises(NSPluginError, match="source must be"):
        emb.default_model(source="download")


def test_package_data_ships_the_packaged_weights_in_a_folder_no_module_shadows():
    """A wheel carries the packaged weights only if setup.py's package_data matches their path; a data folder
    named like a module (the old ``ns_plugin/weights/`` beside ``weights.py``) makes ``ns_plugin.weights``
    mean two things."""
    import ast
    from fnmatch import fnmatch

    import ns_plugin.embedded as emb
    root = Path(__file__).resolve().parents[1]
    tree = ast.parse((root / "setup.py").read_text())
    patterns = ast.literal_eval(next(kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                                     for kw in node.keywords if kw.arg == "package_data"))["ns_plugin"]
    pkg = Path(emb.__file__).resolve().parent
    rel = emb.packaged_weights_path().relative_to(pkg).as_posix()
    assert any(fnmatch(rel, pat) for pat in patterns), (rel, patterns)
    for pat in patterns:
        top = pat.split("/")[0]
        assert not (pkg / f"{top}.py").exists(), f"package data folder {top}/ shadows module ns_plugin.{top}"


def test_checkpoint_roundtrip_weights_only_and_easyrobust_keys(model, tmp_path):
    from ns_plugin.checkpoint import save_checkpoint, load_checkpoint
    from ns_plugin.models import build_default_model
    path = save_checkpoint(tmp_path / "m.pth", model, ema=model, meta={"arch": "ns_vit_digits", "acc": 0.9})
    raw = torch.load(path, weights_only=True)
    assert {"0.mean", "0.std"} <= set(raw["state_dict"]) and any(k.startswith("1.") for k in raw["state_dict"])
    assert "state_dict_ema" in raw and raw["meta"]["arch"] == "ns_vit_digits"
    fresh = load_checkpoint(path, build_default_model())
    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(fresh.eval()(x), model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]  # no temp files left


def test_easyrobust_benchmark_convention_loads_our_checkpoint(model, tmp_path):
    """Reproduce what EasyRobust's benchmarks/benchmark.py does with --ckpt_path."""
    import timm  # noqa: F401
    from torch import nn
    from ns_plugin.checkpoint import save_checkpoint
    from ns_plugin.models import DEFAULT_VIT, Normalize
    from timm.models.vision_transformer import VisionTransformer
    path = save_checkpoint(tmp_path / "m.pth", model)
    ckpt = torch.load(path)  # plain torch.load, as in the harness
    state_dict = ckpt["state_dict"] if "state_dict" in ckpt.keys() else ckpt
    assert "0.mean" in state_dict.keys() and "0.std" in state_dict.keys()
    net = nn.Sequential(Normalize([0.5] * 3, [0.5] * 3), VisionTransformer(**DEFAULT_VIT))
    net.load_state_dict(state_dict)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(net.eval()(x), model(x))


def test_checkpoint_strips_module_prefix_and_refuses_pickles(model, tmp_path):
    from ns_plugin.checkpoint import load_checkpoint, read_checkpoint
    from ns_plugin.models import build_default_model
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "ddp.pth")
    load_checkpoint(tmp_path / "ddp.pth", build_default_model())
    torch.save({"state_dict": model.state_dict(), "obj": Path("x")}, tmp_path / "pickled.pth")
    with pytest.raises(NSPluginError, match="trust"):
        read_checkpoint(tmp_path / "pickled.pth")
    assert isinstance(read_checkpoint(tmp_path / "pickled.pth", trust=True)["obj"], Path)


def test_checkpoint_for_another_architecture_is_one_clear_error(model, tmp_path):
    from ns_plugin.checkpoint import save_checkpoint, load_checkpoint
    from ns_plugin.models import build_default_model
    path = save_checkpoint(tmp_path / "m.pth", model)
    with pytest.raises(NSPluginError, match="another architecture"):
        load_checkpoint(path, build_default_model(depth=2, embed_dim=32))
    with pytest.raises(NSPluginError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth", model)


def test_checkpoint_meta_must_be_safe(model, tmp_path):
    from ns_plugin.checkpoint import save_checkpoint
    with pytest.raises(NSPluginError, match="weights_only"):
        save_checkpoint(tmp_path / "m.pth", model, meta={"p": Path("x")})
    assert not (tmp_path / "m.pth").exists()


def test_image_folder_bad_inputs(tmp_path, digits):
    from ns_plugin.data import image_folder, save_image_folder
    with pytest.raises(NSPluginError, match="does not exist"):
        image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NSPluginError, match="no class sub-folders"):
        image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(NSPluginError, match="no images"):
        image_folder(tmp_path / "noimg")
    x, y = digits.test.tensors
    root = save_image_folder(tmp_path / "ok", x[:6], y[:6])
    ds = image_folder(root, 32)
    assert len(ds) == 6 and ds[0][0].shape == (3, 32, 32)
    with pytest.raises(NSPluginError, match="expects 16x16"):
        image_folder(root, 16, resize=False)
    (root / ds.classes[0] / "notes.txt").write_text("hi")
    with pytest.raises(NSPluginError, match="non-image"):
        image_folder(root)
    (root / ds.classes[0] / "notes.txt").unlink()
    (root / ds.classes[0] / "broken.png").write_bytes(b"not a png")
    ds = image_folder(root)
    idx = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png")][0]
    with pytest.raises(NSPluginError, match="cannot read image"):
        ds[idx]


def test_wrong_image_size_for_model(model):
    from ns_plugin.models import check_images
    with pytest.raises(NSPluginError, match="expects"):
        check_images(torch.rand(2, 3, 64, 64), model)
    with pytest.raises(NSPluginError, match=r"\[0, 1\]"):
        check_images(torch.rand(2, 3, 32, 32) * 2, model)
    check_images(torch.rand(2, 3, 32, 32), model)


def test_cli_help_and_error_exit_code():
    out = subprocess.run([sys.executable, "-m", "ns_plugin", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "ns_plugin", "evaluate", "--checkpoint", "/nonexistent.pth"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("ns-plugin: error:")
    assert "Traceback" not in bad.stderr
