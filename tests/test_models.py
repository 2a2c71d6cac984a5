"""The one model door, ``ns_plugin.create_model``: names, checkpoints (wrapped or bare state dicts), the class
count read one way, EMA weights, and one-line errors. Small untrained models only: nothing is trained here."""
import pytest
import torch

from ns_plugin.errors import NSPluginError


@pytest.fixture
def saved(tmp_path):
    from ns_plugin.checkpoint import save_checkpoint
    from ns_plugin.models import build_default_model
    model = build_default_model(7, seed=3).eval()
    ema = build_default_model(7, seed=4).eval()
    path = save_checkpoint(tmp_path / "m.pth", model, ema=ema, meta={"arch": "ns_vit_digits"})
    return model, ema, path


def test_create_model_from_a_checkpoint_path(saved):
    import ns_plugin
    model, ema, path = saved
    x = torch.rand(2, 3, 32, 32)
    m = ns_plugin.create_model(str(path))                    # architecture from meta["arch"], 7 classes
    assert isinstance(m, torch.nn.Sequential) and type(m[0]).__name__ == "Normalize" and not m.training
    assert torch.equal(m(x), model(x))
    assert torch.equal(ns_plugin.create_model("default", checkpoint=path, use_ema=True)(x), ema(x))
    with pytest.raises(NSPluginError, match="has 7 classes, not num_classes=10"):
        ns_plugin.create_model(path, num_classes=10)
    with pytest.raises(NSPluginError, match="either as the first argument or as checkpoint="):
        ns_plugin.create_model(path, checkpoint=path)


def test_create_model_from_a_bare_timm_state_dict(tmp_path):
    """A plain timm state dict (no Normalize keys) loads into the named architecture; the normaliser comes from
    timm's pretrained_cfg."""
    import timm
    from ns_plugin.models import create_model, input_size, num_classes_of
    net = timm.create_model("test_vit", pretrained=False, num_classes=5).eval()
    torch.save(net.state_dict(), tmp_path / "bare.pth")
    assert num_classes_of(net.state_dict()) == 5
    m = create_model("test_vit", checkpoint=tmp_path / "bare.pth")
    x = torch.rand(1, *input_size(net))
    assert torch.allclose(m(x), net(m[0](x)))
    assert m[0].mean.tolist() == pytest.approx(list(net.pretrained_cfg["mean"]))


def test_create_model_errors_are_one_line(tmp_path):
    from ns_plugin.models import create_model
    with pytest.raises(NSPluginError, match="unknown model 'no_such_net'"):
        create_model("no_such_net")
    with pytest.raises(NSPluginError, match="does not exist"):
        create_model(str(tmp_path / "missing.pth"))
    with pytest.raises(NSPluginError, match="embedded default model has 10 classes, not 3"):
        create_model("default", num_classes=3)
    arch_only = create_model("ns_vit_digits", num_classes=4)  # the architecture, untrained, never trained here
    assert arch_only[1].head.out_features == 4 and arch_only.training
