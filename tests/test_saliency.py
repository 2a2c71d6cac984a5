"""Saliency maps on real timm ViTs and the targeted-nullspace triplet report (OpenReview:d8VrVfNARSy §7, A.3-A.4)."""
import os

import pytest
import torch

from ns_plugin.applications import saliency as S
from ns_plugin.applications import targeted as T
from ns_plugin.errors import NSPluginError


@pytest.fixture(scope="module")
def pairs(digits):
    x, y = digits.test.tensors
    src = x[:4]
    idx = []
    for i in range(4):
        j = next(j for j in range(4, len(y)) if int(y[j]) != int(y[i]) and j not in idx)
        idx.append(j)
    return src, x[idx]


def test_attention_recorder_restores_model_and_rows_are_distributions(model, pairs):
    x = pairs[0]
    blocks = model[1].blocks
    flags = [b.attn.fused_attn for b in blocks]
    n_hooks = [len(b.attn.attn_drop._forward_hooks) for b in blocks]
    with torch.no_grad():
        before = model(x)
        maps = S.attention_maps(model, x)
        after = model(x)
    assert [b.attn.fused_attn for b in blocks] == flags
    assert [len(b.attn.attn_drop._forward_hooks) for b in blocks] == n_hooks
    assert torch.allclose(before, after)
    assert len(maps) == 4 and maps[0].shape == (4, 4, 17, 17)
    assert torch.allclose(maps[2].sum(-1), torch.ones(4, 4, 17), atol=1e-5)
    # same numbers as an explicit softmax(q k^T * scale) from the first block's input
    from ns_plugin.analysis.proposition1 import head_matrices
    feats = {}
    h = blocks[0].norm1.register_forward_hook(lambda m, i, o: feats.setdefault("x", o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    hm = head_matrices(blocks[0].attn)
    xx = feats["x"].double()
    q = torch.einsum("bnd,hdk->bhnk", xx, hm.q) + hm.bq[None, :, None]
    k = torch.einsum("bnd,hdk->bhnk", xx, hm.k) + hm.bk[None, :, None]
    ref = torch.softmax(q @ k.transpose(-1, -2) * hm.scale, -1)
    assert torch.allclose(maps[0].double(), ref, atol=1e-5)


def test_saliency_methods_shapes_targets_and_no_grad_side_effects(model, pairs):
    x = pairs[0]
    for p in model.parameters():
        p.grad = None
    maps = S.saliency_maps(model, x)
    assert set(maps) == {"rollout", "gradcam", "chefer"}
    for m in maps.values():
        assert m.shape == (4, 4, 4) and torch.isfinite(m).all() and (m >= 0).all()
    assert all(p.grad is None for p in model.parameters())
    # class-specific methods depend on the class explained; rollout does not
    pred = model(x).argmax(1)
    other = (pred + 1) % 10
    for name in ("gradcam", "chefer"):
        a = S.saliency_maps(model, x, pred, methods=(name,))[name]
        b = S.saliency_maps(model, x, other, methods=(name,))[name]
        assert torch.allclose(a, maps[name]) and not torch.allclose(a, b)
    # maps differ between images (not a constant pattern)
    assert not torch.allclose(maps["chefer"][0], maps["chefer"][1])
    with pytest.raises(NSPluginError, match="unknown saliency"):
        S.saliency_maps(model, x, methods=("lrp-magic",))
    with pytest.raises(NSPluginError, match="target"):
        S.grad_cam(model, x, target=[1, 2])


def test_map_similarity_metrics():
    a = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    assert S.map_similarity(a, a) == {"pearson": pytest.approx(1), "spearman": pytest.approx(1), "topk_iou": 1.0}
    r = S.map_similarity(a, -a, k=2)
    assert r["pearson"] == pytest.approx(-1) and r["topk_iou"] == 0.0
    b = torch.tensor([[0.0, 1.0], [3.0, 20.0]])          # same order, not linear
    r = S.map_similarity(a, b, k=0.5)
    assert r["spearman"] == pytest.approx(1) and r["pearson"] < 0.99 and r["topk_iou"] == 1.0
    from scipy.stats import pearsonr, spearmanr
    g = torch.Generator().manual_seed(0)
    u, v = torch.rand(4, 4, generator=g), torch.rand(4, 4, generator=g)
    r = S.map_similarity(u, v)
    assert r["pearson"] == pytest.approx(pearsonr(u.flatten(), v.flatten())[0])
    assert r["spearman"] == pytest.approx(spearmanr(u.flatten(), v.flatten())[0])
    with pytest.raises(NSPluginError, match="same shape"):
        S.map_similarity(a, a.flatten())


def test_targeted_projection_triplets_keep_source_prediction_and_maps(model, pairs, tmp_path):
    src, tgt = pairs
    rep = T.targeted_triplets(model, src, tgt, methods=("rollout", "chefer"))
    s = rep.summary
    assert s["mode"] == "project" and s["fit"] == "none" and s["n"] == 4
    assert s["embedding_residual"] < 1e-5 and s["max_logit_diff"] < 1e-3
    assert s["match_source"] == 1.0 and s["source_target_differ"] == 1.0 and s["match_target"] == 0.0
    assert s["l2_to_target"] < s["l2_source_target"] and s["closer_to_target"] == 1.0
    for m in ("rollout", "chefer"):
        assert s["saliency"][m]["vs_source"]["pearson"] > 0.999
        assert s["saliency"][m]["vs_target"]["pearson"] < 0.9
        assert s["saliency_closer_to_source"][m]
    # the unconstrained image leaves [0, 1]; clipping it is measured, not hidden
    assert s["out_of_range"] > 0 and s["clipped"]["max_logit_diff"] > s["max_logit_diff"]
    out = T.plot_triplets(rep, tmp_path / "fig" / "triplets.png", max_triplets=2)
    assert out.exists() and out.stat().st_size > 1000 and os.listdir(out.parent) == ["triplets.png"]
    with pytest.raises(NSPluginError, match="format"):
        T.plot_triplets(rep, tmp_path / "fig" / "triplets.txt")
    assert os.listdir(out.parent) == ["triplets.png"]


def test_targeted_fits_channels_and_custom_transform(model, pairs):
    src, tgt = pairs
    clip = T.targeted_triplets(model, src, tgt, transform=T.nullspace_transform(model, fit="clip"),
                               saliency=False).summary
    assert clip["out_of_range"] == 0 and clip["embedding_residual"] > 1e-3
    scale = T.nullspace_transform(model, fit="scale")(src, tgt)
    assert scale.min() >= 0 and scale.max() <= 1
    red = T.nullspace_transform(model, mode="channels", channels=(0,))
    out = red(src, tgt)
    assert torch.equal(out[:, 1:], tgt[:, 1:])           # green and blue are the target's (OpenReview:d8VrVfNARSy A.3)
    assert red.nullspace.embedding_residual(out.double() - src.double()) < 1e-6 * float(out.abs().max())
    same = T.targeted_triplets(model, src, tgt, transform=lambda s, t: t.clone(), methods=("gradcam",)).summary
    assert same["match_target"] == 1.0 and same["saliency"]["gradcam"]["vs_target"]["pearson"] > 0.999
    assert same["mode"] == "custom"
    with pytest.raises(NSPluginError, match="transform must return"):
        T.targeted_triplets(model, src, tgt, transform=lambda s, t: s[:1], saliency=False)
    with pytest.raises(NSPluginError, match="channels"):
        T.nullspace_transform(model, mode="channels", channels=(5,))
    with pytest.raises(NSPluginError, match=r"\[0, 1\]"):
        T.targeted_triplets(model, src * 2, tgt, saliency=False)


def test_models_without_exact_nullspace_or_attention_are_refused(pairs):
    import timm
    from ns_plugin.models import build_default_model
    full_rank = build_default_model(10, seed=0, patch_size=2, embed_dim=32, depth=1, num_heads=2).eval()
    with pytest.raises(NSPluginError, match="no exact nullspace"):
        T.nullspace_transform(full_rank)
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    with pytest.raises(NSPluginError):
        T.nullspace_transform(cnn)
    with pytest.raises(NSPluginError, match="VisionTransformer"):
        S.saliency_maps(cnn, pairs[0][:1])


def test_triplets_reuse_the_targeted_attack(model, digits):
    """The triplet driver with the torchattacks TargetedNullspace attack: in-range images, same predictions."""
    from ns_plugin.applications.targeted import attack_transform, targeted_triplets
    x, y = digits.test.tensors
    src, tgt = x[:4], x[10:14]
    rep = targeted_triplets(model, src, tgt, transform=attack_transform(model), saliency=False)
    assert rep.transformed.min() >= 0 and rep.transformed.max() <= 1
    assert rep.summary["match_source"] == 1.0
    d_before = (src - tgt).flatten(1).norm(dim=1).mean()
    d_after = (rep.transformed - tgt).flatten(1).norm(dim=1).mean()
    assert d_after < d_before
