"""The ns_plugin attacks on the real trained tiny ViT (timm) through torchattacks' Attack machinery."""
import pytest
import torch
from torch import nn

from ns_plugin.attacks import DamageNet, EmbeddingMatch, NullspaceNoise, PatchFool, TargetedNullspace
from ns_plugin.anatomy import AttentionRecorder
from ns_plugin.errors import NSPluginError
from ns_plugin.models import unwrap
from ns_plugin.nullspace.exact import exact_nullspace


@pytest.fixture(scope="module")
def batch(digits):
    x, y = digits.test.tensors
    return x[:8].clone(), y[:8].clone()


def preds(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def in_unit_box(t):
    return bool(t.min() >= 0) and bool(t.max() <= 1)


# -- NullspaceNoise -------------------------------------------------------------------------------------
def test_nullspace_noise_keeps_predictions_exactly(model, batch):
    x, y = batch
    atk = NullspaceNoise(model, std=0.1, iters=20)
    adv = atk(x, y)
    assert adv.shape == x.shape and in_unit_box(adv)
    info = atk.last_info
    assert float(info["noise_l2"].mean()) > 0.5  # real noise, not the identity
    assert info["embedding_residual"] < 1e-5 and info["pred_match"] == 1.0
    assert torch.equal(preds(model, adv), preds(model, x))
    # the returned perturbation lies in the patch nullspace, patch by patch
    ns = exact_nullspace(model)
    assert ns.embedding_residual((adv - x).double()) < 1e-5
    # same seed -> same noise; other seed -> other noise
    assert torch.equal(NullspaceNoise(model, std=0.1, iters=20)(x), adv)
    assert not torch.equal(NullspaceNoise(model, std=0.1, seed=1, box="shrink")(x), adv)


def test_nullspace_noise_clip_leaves_the_nullspace_shrink_does_not(model, batch):
    x, _ = batch
    clip = NullspaceNoise(model, std=0.3, box="clip")
    clip(x)
    shrink = NullspaceNoise(model, std=0.3, box="shrink")
    shrink(x)
    assert clip.last_info["embedding_residual"] > 1e-2  # saturated pixels break the invariance
    assert shrink.last_info["embedding_residual"] < 1e-5 and shrink.last_info["pred_match"] == 1.0
    assert float(shrink.last_info["kept"].max()) <= 1.0 + 1e-9


def test_nullspace_noise_with_set_normalization_used(model, batch):
    """torchattacks' convention: bare model + set_normalization_used; inputs and outputs normalised."""
    x, _ = batch
    norm, core = unwrap(model)
    mean, std = norm.mean.tolist(), norm.std.tolist()
    for box, tol in [("shrink", 1e-5), ("project", 0.05)]:  # Dykstra (float32 iterations) is not bit-stable
        ref = NullspaceNoise(model, std=0.1, box=box, iters=20)(x)
        atk = NullspaceNoise(core, std=0.1, box=box, iters=20)
        atk.set_normalization_used(mean, std)
        out = atk(norm(x))
        assert torch.allclose(out, norm(ref), atol=tol), box
        assert torch.equal(preds(core, out), preds(model, x))
        assert atk.last_info["embedding_residual"] < 1e-5


def test_nullspace_attacks_refuse_models_without_patch_nullspace():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    for cls in (NullspaceNoise, TargetedNullspace):
        with pytest.raises(NSPluginError, match="overlapping|patch"):
            cls(cnn)
    with pytest.raises(NSPluginError, match="attention"):
        PatchFool(cnn)


# -- TargetedNullspace ----------------------------------------------------------------------------------
def test_targeted_nullspace_moves_towards_target_and_keeps_the_prediction(model, batch):
    x, y = batch
    target = x.roll(3, 0)
    atk = TargetedNullspace(model, iters=60)
    adv = atk(x, y, target_images=target)
    info = atk.last_info
    assert adv.shape == x.shape and in_unit_box(adv)
    assert bool((info["target_l2_after"] < info["target_l2_before"] - 0.5).all())
    assert info["embedding_residual"] < 1e-5 and info["pred_match"] == 1.0
    # the unconstrained version gets closer to the target but, clipped, leaves the nullspace
    clip = TargetedNullspace(model, box="clip")
    clip(x, target_images=target)
    assert float(clip.last_info["target_l2_after"].mean()) < float(info["target_l2_after"].mean())
    assert clip.last_info["embedding_residual"] > 1e-2


def test_targeted_nullspace_red_variant_and_target_setting(model, batch):
    x, y = batch
    target = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    atk = TargetedNullspace(model, target=target, channels="red", iters=30)
    adv = atk(x, y)
    assert in_unit_box(adv)
    # appendix A.3: green and blue are the target's, only red is solved for
    assert torch.allclose(adv[:, 1:], target[:, 1:].expand(len(x), -1, -1, -1), atol=1e-6)
    with torch.no_grad():  # pred_match is the measured agreement of the model on source and output
        want = float((model(x).argmax(1) == model(adv).argmax(1)).float().mean())
    assert atk.last_info["pred_match"] == pytest.approx(want) and atk.last_info["embedding_residual"] >= 0
    # default target (built from the model alone) is used after set_target_images(None)
    atk.set_target_images(None)
    assert atk(x).shape == x.shape
    with pytest.raises(NSPluginError, match="target images have shape"):
        atk(x, target_images=torch.rand(1, 3, 16, 16))
    with pytest.raises(NSPluginError, match="3 target images for 8"):
        atk(x, target_images=torch.rand(3, 3, 32, 32))
    with pytest.raises(NSPluginError, match=r"\[0, 1\]"):
        atk.set_target_images(torch.rand(1, 3, 32, 32) * 3)


# -- PatchFool ------------------------------------------------------------------------------------------
def _changed_patches(x, adv, p=8):
    diff = (adv - x).abs().sum(1, keepdim=True)
    return nn.functional.max_pool2d(diff, p).flatten(1).gt(0).sum(1)


def test_attention_recorder_matches_timm_and_restores_fused(model, batch):
    x, _ = batch
    _, core = unwrap(model)
    before = [b.attn.fused_attn for b in core.blocks]
    ref = model(x)
    with AttentionRecorder(core) as rec:
        out = model(x)
    maps = rec.attn
    assert len(maps) == len(core.blocks) and maps[0].shape == (8, 4, 17, 17)
    assert torch.allclose(maps[0].sum(-1), torch.ones(8, 4, 17))
    assert torch.allclose(out, ref, atol=1e-5)  # explicit path == fused path
    assert [b.attn.fused_attn for b in core.blocks] == before


def test_patchfool_fools_by_perturbing_only_the_most_attended_patch(model, batch):
    x, y = batch
    torch.manual_seed(0)
    atk = PatchFool(model, steps=25)
    adv = atk(x, y)
    assert adv.shape == x.shape and in_unit_box(adv)
    assert bool((_changed_patches(x, adv) <= 1).all())
    assert (preds(model, adv) == y).float().mean() < (preds(model, x) == y).float().mean()
    # the chosen patch is the one receiving the most attention at select_layer (averaged over heads, queries)
    _, core = unwrap(model)
    with AttentionRecorder(core) as rec, torch.no_grad():
        model(x)
    maps = rec.attn
    score = maps[atk.select_layer].mean(1).mean(1)[:, 1:]
    assert torch.equal(atk.last_info["patch_index"][:, 0], score.argmax(1))


def test_patchfool_mild_sparse_and_targeted(model, batch):
    x, y = batch
    torch.manual_seed(0)
    mild = PatchFool(model, patches=2, eps=16 / 255, steps=10)
    adv = mild(x, y)
    assert float((adv - x).abs().max()) <= 16 / 255 + 1e-6
    assert bool((_changed_patches(x, adv) <= 2).all())
    sparse = PatchFool(model, sparse_pixels=10, steps=10)
    adv = sparse(x, y)
    assert bool(((adv - x).abs().sum(1).flatten(1).gt(0).sum(1) <= 10).all())
    tgt = PatchFool(model, steps=10)
    tgt.set_mode_targeted_by_function(lambda images, labels: (labels + 1) % 10, quiet=True)
    adv = tgt(x, y)
    assert adv.shape == x.shape and in_unit_box(adv)
    with pytest.raises(NSPluginError, match="patches"):
        PatchFool(model, patches=17, steps=1)(x, y)


# -- EmbeddingMatch -------------------------------------------------------------------------------------
def test_embedding_match_reaches_the_target_representation(model, batch):
    x, y = batch
    target = x.roll(1, 0)
    atk = EmbeddingMatch(model, steps=40, lr=0.03)
    adv = atk(x, y, target_images=target)
    info = atk.last_info
    assert adv.shape == x.shape and in_unit_box(adv)
    assert float(info["cosine"].mean()) > 0.9 > float(info["cosine_start"].mean())
    assert float(info["pixel_change_mean_abs"].mean()) > 0 and info["steps"] <= 40
    assert (preds(model, adv) == preds(model, target)).float().mean() >= 0.75
    logits = EmbeddingMatch(model, representation="logits", steps=5)
    logits(x, y)
    assert logits.last_info["loss"].shape == (8,)


# -- DamageNet ------------------------------------------------------------------------------------------
def test_damagenet_serves_a_pregenerated_set_in_order(model, batch, tmp_path):
    from ns_plugin.data import save_image_folder
    x, y = batch
    adv_set = (1 - x).clamp(0, 1)  # any stored images
    order = torch.argsort(y * 100 + torch.arange(8), stable=True)  # ImageFolder order: by class, then file
    save_image_folder(tmp_path / "set", adv_set[order], y[order], classes=[str(c) for c in range(10)])
    atk = DamageNet(model, root=tmp_path / "set")
    assert len(atk) == 8
    xs, ys = x[order], y[order]
    out1 = atk(xs[:5], ys[:5])
    out2 = atk(xs[5:], ys[5:])
    assert torch.allclose(torch.cat([out1, out2]), adv_set[order], atol=1 / 255 + 1e-6)  # PNG quantisation
    with pytest.raises(NSPluginError, match="runs past its end"):
        atk(xs[:1], ys[:1])
    atk.reset()
    with pytest.raises(NSPluginError, match="out of step"):
        atk(xs[:2], (ys[:2] + 1) % 10)
    out = atk(xs[:2], ys[2:4], indices=[2, 3])
    assert torch.allclose(out, adv_set[order][2:4], atol=1 / 255 + 1e-6)


def test_damagenet_labels_file_and_errors(model, batch, tmp_path):
    from torchvision.utils import save_image
    x, y = batch
    (tmp_path / "flat").mkdir()
    lines = []
    for i in range(3):
        save_image(x[i], str(tmp_path / "flat" / f"a{i}.png"))
        lines.append(f"a{i}.png {int(y[i])}")
    (tmp_path / "flat" / "labels.txt").write_text("\n".join(lines))
    atk = DamageNet(model, root=tmp_path / "flat")
    assert torch.allclose(atk(x[:3], y[:3]), x[:3], atol=1 / 255 + 1e-6)
    with pytest.raises(NSPluginError, match="does not exist"):
        DamageNet(model, root=tmp_path / "missing")
    small = tmp_path / "small" / "0"
    small.mkdir(parents=True)
    save_image(torch.rand(3, 16, 16), str(small / "s.png"))
    with pytest.raises(NSPluginError, match="shape"):
        DamageNet(model, root=tmp_path / "small")(x[:1])
    resized = DamageNet(model, root=tmp_path / "small", image_size=32)(x[:1])
    assert resized.shape == (1, 3, 32, 32)


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda m: NullspaceNoise(m), lambda m: TargetedNullspace(m, iters=2), lambda m: PatchFool(m, steps=1),
    lambda m: EmbeddingMatch(m, steps=1)], ids=["NullspaceNoise", "TargetedNullspace", "PatchFool", "EmbeddingMatch"])
def test_bad_inputs_are_rejected_with_clear_errors(model, batch, make):
    x, y = batch
    atk = make(model)
    with pytest.raises(NSPluginError, match=r"\[0, 1\]"):
        atk((x - 0.5) / 0.25, y)  # normalised images
    with pytest.raises(NSPluginError, match=r"\(N, C, H, W\)"):
        atk(x[0], y[:1])
    with pytest.raises(NSPluginError, match="expects"):
        atk(torch.rand(2, 3, 16, 16), y[:2])
    with pytest.raises(NSPluginError, match="labels must have shape"):
        atk(x, nn.functional.one_hot(y, 10))
    with pytest.raises(NSPluginError, match="labels must have shape"):
        atk(x, y[:3])
