"""An unchanged third-party program sees our models and attacks through ``ns-plugin run`` (a sitecustomize
post-import hook), and ``register_checkpoint`` reads every checkpoint we write."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ns_plugin.errors import NSPluginError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_style_checkpoint(trained, tmp_path_factory):
    """A checkpoint with the meta ``ns-plugin train`` writes: a hash in ``arch``, the model name in ``model``."""
    from ns_plugin.checkpoint import save_checkpoint
    path = tmp_path_factory.mktemp("ck") / "model.pth"
    save_checkpoint(path, trained[0], meta={"arch": "29d2c0ffee", "model": "default", "method": "ns",
                                            "config": {"data": "digits", "model": "default"}})
    return path


def test_register_checkpoint_reads_train_output(train_style_checkpoint, digits):
    import timm
    from ns_plugin.integrations.timm import register_checkpoint
    names = register_checkpoint("launcher_ck", train_style_checkpoint)
    assert names[0] == "launcher_ck" and "launcher_ck_imagenet_linf" in names
    net = timm.create_model("launcher_ck", pretrained=True).eval()
    x, y = digits.test.tensors
    with torch.no_grad():
        assert net.pretrained_cfg["input_size"] == (3, 32, 32)
        acc = (net((x[:64] - torch.tensor(net.pretrained_cfg["mean"]).view(1, 3, 1, 1))
                   / torch.tensor(net.pretrained_cfg["std"]).view(1, 3, 1, 1)).argmax(1) == y[:64]).float().mean()
    assert acc > 0.8


def test_unknown_arch_is_one_clear_line(trained, tmp_path):
    from ns_plugin.checkpoint import save_checkpoint
    from ns_plugin.integrations.timm import register_checkpoint
    p = tmp_path / "odd.pth"
    save_checkpoint(p, trained[0], meta={"arch": "29d2c0ffee", "model": "no_such_net"})
    with pytest.raises(NSPluginError, match="does not name a known architecture.*pass arch="):
        register_checkpoint("odd_ck", p)


#: what EasyRobust's benchmarks/benchmark.py does with --model/--ckpt_path, what torchattacks' test suite loops
#: over, and robustbench's load_model, in a program that never imports ns_plugin itself
PROGRAM = textwrap.dedent('''
    import sys, torch, timm, torchattacks
    from timm.models import create_model
    model = create_model("nsck", pretrained=False, num_classes=10)
    sd = torch.load(sys.argv[1])["state_dict"]
    assert "0.mean" in sd
    model = torch.nn.Sequential(torch.nn.Module(), model)
    model[0].register_buffer("mean", torch.zeros(3)); model[0].register_buffer("std", torch.ones(3))
    model.load_state_dict(sd)
    assert {"PatchFool", "NullspaceNoise", "TargetedNullspace", "EmbeddingMatch"} <= set(torchattacks.__all__)
    from robustbench.utils import load_model
    rb = load_model("nsck", dataset="imagenet", threat_model="Linf")
    assert rb(torch.rand(2, 3, 32, 32)).shape == (2, 1000)
    try:
        load_model("nsck", dataset="cifar10", threat_model="Linf")
    except Exception as e:
        print("cifar10:", type(e).__name__, str(e).splitlines()[0])
    print("seen", sorted(n for n in timm.list_models("ns*")))
''')


def test_ns_plugin_run_makes_an_unchanged_program_see_our_models(train_style_checkpoint, tmp_path):
    script = tmp_path / "third_party.py"
    script.write_text(PROGRAM)
    env = {k: v for k, v in os.environ.items() if k != "NS_PLUGIN_RUN"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-m", "ns_plugin", "run", "--checkpoint", f"nsck={train_style_checkpoint}",
                          "--", sys.executable, str(script), str(train_style_checkpoint)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-1500:]
    assert "nsck" in out.stdout and "ns_vit_digits" in out.stdout
    assert "cifar10: NSPluginError" in out.stdout and "registered for robustbench dataset(s) imagenet" in out.stdout


def test_ns_plugin_run_refuses_a_bad_checkpoint_before_starting(tmp_path):
    from ns_plugin.cli import main
    assert main(["run", "--checkpoint", f"x={tmp_path / 'missing.pth'}", "--", "true"]) == 2
    assert main(["run", "--checkpoint", "no_equals_sign", "--", "true"]) == 2
