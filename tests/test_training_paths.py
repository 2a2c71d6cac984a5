"""Training paths the method tests do not cover: an ImageFolder, a timm model by name, gradient clipping,
``sched: constant``, ``madry_clean_weight``, and the EasyRobust ``train_one_epoch`` with timm's loss scaler and
mixup. Each run is a few steps on a few images."""
import argparse
import copy

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread", "default_model_cache")

SMALL = dict(rounds=1, steps_per_round=2, batch_size=8, search_batch_size=8, lr=1e-4, noise_max_steps=20,
             pgd_steps=1, progress=False, plot=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, digits):
    from ns_plugin.data import save_image_folder
    x, y = digits.train.tensors
    keep = torch.cat([torch.nonzero(y == k).flatten()[:3] for k in range(10)])  # 3 images of each class
    return save_image_folder(tmp_path_factory.mktemp("imgs") / "train", x[keep], y[keep])


def _cfg(**kw):
    from ns_plugin.training import load_config
    return load_config(**{**SMALL, **kw})


@pytest.mark.parametrize("model_name", ["default", "test_vit"])
def test_trains_on_an_image_folder_and_a_timm_model_by_name(folder, model_name):
    """``data: <ImageFolder>`` reads the 30 PNGs (resized to the model's input size); ``model: test_vit`` is
    built by timm from its name, with ``num_classes`` classes."""
    from ns_plugin.models import input_size
    from ns_plugin.training import Trainer
    kw = {"num_classes": 10} if model_name != "default" else {}
    t = Trainer(_cfg(method="ns", data=str(folder), model=model_name, **kw))
    assert len(t.train_set) == 30
    assert tuple(t.train_set[0][0].shape) == input_size(t.raw)
    assert type(t.raw[1]).__name__ == "VisionTransformer" and t.raw[1].head.out_features == 10
    if model_name == "test_vit":
        assert t.raw[1].embed_dim == 64 and len(t.raw[1].blocks) == 6  # timm's test_vit, not the default
    before = copy.deepcopy(t.raw.state_dict())
    s = t.run()
    assert s["steps"] == 2 and torch.isfinite(torch.tensor(s["log"][-1]["loss"]))
    assert s["log"][-1]["noise_norm"] > 0
    changed = [k for k, v in t.raw.state_dict().items() if not torch.equal(v, before[k])]
    assert "1.head.weight" in changed


def test_gradient_clipping_bounds_the_norm_the_optimizer_sees(model, digits):
    from ns_plugin.training import Trainer
    from torch.utils.data import TensorDataset
    x, y = digits.train.tensors
    data = TensorDataset(x[:16], y[:16])
    norms = {}
    for clip in (None, 1e-3):
        t = Trainer(_cfg(method="standard", clip_grad=clip), model=copy.deepcopy(model), train_set=data)
        seen = []
        t.opt.register_step_pre_hook(lambda opt, args, kwargs: seen.append(float(torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"] if p.grad is not None])))))
        t.run()
        norms[clip] = seen
    assert len(norms[None]) == len(norms[1e-3]) == 2
    assert min(norms[None]) > 1e-2                          # unclipped gradients are far above the bound ...
    assert max(norms[1e-3]) <= 1e-3 * (1 + 1e-4)            # ... and clipped ones are at most clip_grad


def test_constant_schedule_keeps_the_learning_rate(model, digits):
    from ns_plugin.training import Trainer
    from torch.utils.data import TensorDataset
    x, y = digits.train.tensors
    data = TensorDataset(x[:16], y[:16])
    lrs = {}
    for sched in ("constant", "cosine"):
        t = Trainer(_cfg(method="standard", sched=sched, steps_per_round=3), model=copy.deepcopy(model),
                    train_set=data)
        t.run()
        lrs[sched] = t.opt.param_groups[0]["lr"]
    assert lrs["constant"] == pytest.approx(1e-4, rel=0, abs=0)
    assert lrs["cosine"] < 0.5e-4                          # cosine has decayed after 3 of 3 steps


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_madry_clean_weight(model, digits, weight):
    """Classic Madry is CE(adv) only; ``madry_clean_weight: w`` adds w * CE(clean)."""
    import torch.nn.functional as F
    from ns_plugin.training import Trainer
    from torch.utils.data import TensorDataset
    x, y = digits.train.tensors
    t = Trainer(_cfg(method="madry", madry_clean_weight=weight), model=model, train_set=TensorDataset(x[:16], y[:16]))
    loss, parts = t.method.loss(t, x[:8], y[:8])
    if weight == 0:
        assert "ce_clean" not in parts and float(loss) == pytest.approx(float(parts["ce_adv"]), rel=1e-6)
    else:
        with torch.no_grad():
            clean = float(F.cross_entropy(t.model(x[:8]), y[:8]))
        assert float(parts["ce_clean"]) == pytest.approx(clean, rel=1e-5)
        assert float(loss) == pytest.approx(float(parts["ce_adv"]) + weight * clean, rel=1e-5)


def test_train_one_epoch_with_timm_loss_scaler_and_mixup(model, digits):
    """EasyRobust's/timm's script path: timm's NativeScaler (clipping inside it) and Mixup's soft targets."""
    import warnings
    from timm.data import Mixup
    from timm.utils import NativeScaler
    from ns_plugin.integrations.easyrobust import train_one_epoch

    class CountingScaler(NativeScaler):
        calls = 0

        def __call__(self, *a, **kw):
            type(self).calls += 1
            assert kw["clip_grad"] == 1.0 and kw["clip_mode"] == "norm"
            return super().__call__(*a, **kw)

    x, y = digits.train.tensors
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:32], y[:32]), batch_size=8)
    args = argparse.Namespace(method="ns", steps_per_round=2, search_batch_size=8, noise_max_steps=20,
                              clip_grad=1.0, clip_mode="norm")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    mixup = Mixup(mixup_alpha=0.8, num_classes=10, label_smoothing=0.1)
    seen = []
    orig = mixup.__call__

    def spy(xb, yb):
        out = orig(xb, yb)
        seen.append(out[1])
        return out
    mixup_fn = spy
    before = model[1].head.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.cuda.amp.GradScaler disables itself without CUDA
        scaler = CountingScaler()
        m = train_one_epoch(0, model, loader, opt, None, args, loss_scaler=scaler, mixup_fn=mixup_fn)
    assert CountingScaler.calls == 4 and len(seen) == 4
    assert seen[0].shape == (8, 10) and not torch.equal(seen[0], seen[0].round())  # soft targets reached the loss
    assert torch.isfinite(torch.tensor(m["loss"])) and not torch.equal(before, model[1].head.weight)


def test_digits_are_upsampled_to_a_timm_model_input_size(caplog):
    """``data: digits`` (32x32 by default) with ``model: test_vit`` (timm, 160x160 input): the digits are
    upsampled to the model's input size, as timm's data config would (one info line), and so are the held-out
    images the NS rounds measure; an ``image_size`` the model cannot take is one clear error."""
    import logging

    from ns_plugin.errors import NSPluginError
    from ns_plugin.models import input_size
    from ns_plugin.training import Trainer
    cfg = _cfg(method="ns", model="test_vit", num_classes=10, train_limit=16, heldout_size=8)
    with caplog.at_level(logging.INFO, logger="ns_plugin.training.loop"):
        t = Trainer(cfg)
    assert [r.getMessage() for r in caplog.records if r.name == "ns_plugin.training.loop"] == [
        "the digits data is upsampled to 160x160, the model's input size"]
    assert input_size(t.raw) == (3, 160, 160) and tuple(t.train_set.tensors[0].shape) == (16, 3, 160, 160)
    s = t.run()
    assert s["steps"] == 2 and torch.isfinite(torch.tensor(s["log"][-1]["loss"]))
    assert tuple(t.heldout_images().shape) == (8, 3, 160, 160) and "heldout_mse_prob" in s["log"][-1]
    with pytest.raises(NSPluginError, match="image_size 32 does not match the model's input size 160"):
        Trainer(_cfg(method="standard", model="test_vit", num_classes=10, image_size=32))
