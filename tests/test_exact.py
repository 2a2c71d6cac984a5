"""Exact patch-embedding nullspace (arXiv:2403.10476 §3.1, Table 1)."""
import subprocess
import sys

import pytest
import timm
import torch

import ns_plugin
from ns_plugin.errors import NSPluginError
from ns_plugin.nullspace.exact import PAPER_TABLE1, exact_nullspace, table1, verify_invariance


def test_basis_is_orthonormal_and_in_the_kernel(model):
    ns = ns_plugin.exact_nullspace(model)
    assert (ns.nullity, ns.input_dim, ns.embed_dim, ns.patch_size) == (128, 192, 64, (8, 8))
    b = ns.basis
    assert torch.allclose(b @ b.T, torch.eye(ns.nullity, dtype=b.dtype), atol=1e-10)
    assert (ns.weight @ b.T).abs().max() < 1e-10
    # the pixel-space map folds in the normaliser: W_pixel = W_conv / std
    conv = model[1].patch_embed.proj.weight.detach().double().reshape(64, -1)
    assert torch.allclose(ns.weight, conv / model[0].std.double()[0])


def test_invariance_float32_and_float64(model, digits):
    x = digits.test.tensors[0][:16]
    ns = exact_nullspace(model)
    g = torch.Generator().manual_seed(0)
    for per_patch in (True, False):
        v = ns.sample(16, 0.2, per_patch=per_patch, generator=g, dtype=torch.float64)
        assert v.shape == (16, 3, 32, 32) and v.abs().max() > 0.05
        r64 = verify_invariance(model, x, v, dtype=torch.float64)
        assert r64["max_embed_diff"] < 1e-10 and r64["max_logit_diff"] < 1e-9 and r64["pred_match"] == 1.0
        r32 = verify_invariance(model, x, v.float(), dtype=torch.float32)
        assert r32["max_logit_diff"] < 1e-4 and r32["pred_match"] == 1.0
    tiled = ns.sample(2, 0.2, per_patch=False, generator=g)
    p = ns.to_patches(tiled)
    assert torch.allclose(p[:, :1].expand_as(p), p)
    # a random perturbation of the same size does change the output: the test can fail
    rnd = torch.randn_like(x) * v.std()
    assert verify_invariance(model, x, rnd)["max_logit_diff"] > 1e-2


def test_projection_is_idempotent_and_orthogonal(model):
    ns = exact_nullspace(model)
    d = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    p = ns.project(d)
    assert torch.allclose(ns.project(p), p, atol=1e-12)
    assert ns.embedding_residual(p) < 1e-10
    assert abs(float(((d - p) * p).sum())) < 1e-8
    assert ns.project(d[0]).shape == (3, 32, 32)
    assert torch.allclose(ns.from_patches(ns.to_patches(d)), d)


def test_patch_order_matches_timm_tokens(model):
    """to_patches must order and flatten patches exactly as timm's patch_embed does."""
    ns = exact_nullspace(model, space="normalized")
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    m = model.double()
    tokens = m[1].patch_embed(x)
    w = m[1].patch_embed.proj.weight.reshape(64, -1)
    mine = ns.to_patches(x) @ w.T + m[1].patch_embed.proj.bias
    assert torch.allclose(tokens, mine, atol=1e-10)


def test_max_scale_keeps_pixels_in_range_and_clipping_breaks_invariance(model, digits):
    ns = exact_nullspace(model)
    x = torch.rand(4, 3, 32, 32) * 0.5 + 0.25  # no saturated pixels
    x = x.double()
    v = ns.sample(4, 1.0, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = ns.max_scale(x, v)
    assert (s > 0).all()
    inside = x + 0.999 * s[:, None, None, None] * v
    assert inside.min() >= 0 and inside.max() <= 1
    assert ((x + 1.01 * s[:, None, None, None] * v) < 0).any() or ((x + 1.01 * s[:, None, None, None] * v) > 1).any()
    ok = verify_invariance(model, x, 0.999 * s[:, None, None, None] * v)
    assert ok["max_embed_diff"] < 1e-10
    # digits have exact 0 background: any nullspace noise pushes some pixel outside, max_scale is 0 ...
    xd = digits.test.tensors[0][:4].double()
    assert torch.all(ns.max_scale(xd, v) == 0)
    # ... and clipping the noisy image back to [0,1] leaves the nullspace: the output changes
    clipped = verify_invariance(model, xd, 3 * v, clip=True)
    assert clipped["max_embed_diff"] > 1e-3 and clipped["max_logit_diff"] > 1e-3


def test_table1_from_architectures():
    rows = {r["model"]: r for r in table1(["vit_tiny_patch16_224", "vit_base_patch32_224", "vit_base_patch16_224",
                                           "vit_base_patch8_224", "swin_tiny_patch4_window7_224", "convnext_atto",
                                           "deit_tiny_distilled_patch16_224"])}
    for name in ("vit_tiny_patch16_224", "vit_base_patch32_224", "vit_base_patch8_224"):
        assert rows[name]["nullity"] == PAPER_TABLE1[name]
    # ViT-B/16: a full-rank 768x768 map has nullity 0; the paper's 2 comes from the trained weights
    assert rows["vit_base_patch16_224"]["nullity"] == 0 and PAPER_TABLE1["vit_base_patch16_224"] == 2
    assert rows["deit_tiny_distilled_patch16_224"]["nullity"] == 576
    assert rows["swin_tiny_patch4_window7_224"]["input_dim"] == 48
    assert rows["convnext_atto"]["layer"] == "stem.0"


def test_rank_deficient_weights_raise_the_nullity():
    """What happens to ViT-B/16's released weights: a rank-deficient map has a larger nullspace."""
    m = timm.create_model("vit_base_patch16_224", pretrained=False, depth=1)
    w = m.patch_embed.proj.weight.data.reshape(768, -1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    s[-2:] = 0
    m.patch_embed.proj.weight.data = (u @ torch.diag(s) @ vh).reshape(768, 3, 16, 16)
    ns = exact_nullspace(m, space="normalized", tol=1e-4)
    assert ns.nullity == 2
    v = ns.sample(1, 1.0, image_size=(224, 224))
    x = torch.rand(1, 3, 224, 224)
    assert verify_invariance(m, x, v)["max_logit_diff"] < 1e-9


def test_default_tolerance_follows_the_stored_dtype():
    """ViT-B/16 patch map with two singular values zeroed, stored in float32 (as released weights are): the
    zeros come back at ~1e-9 relative. NumPy/SciPy count them as null for a float32 array, and so must we;
    the same map stored in float64 keeps them at ~1e-17 and gives 2 with float64's cut-off."""
    import numpy as np
    import scipy.linalg

    m = timm.create_model("vit_base_patch16_224", pretrained=False, depth=1)
    w = m.patch_embed.proj.weight.detach().double().reshape(768, -1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    s[-2:] = 0
    w32 = (u @ torch.diag(s) @ vh).float()
    m.patch_embed.proj.weight.data = w32.reshape(768, 3, 16, 16).clone()
    ns = exact_nullspace(m, space="normalized")
    assert ns.nullity == 2 and ns.rank == 766
    a = w32.numpy()
    assert np.linalg.matrix_rank(a) == 766 and scipy.linalg.null_space(a).shape[1] == 2
    small = ns.singular_values[-2:] / ns.singular_values[0]
    assert float(small.max()) > 1e-12          # float64 precision alone would have called them non-zero
    assert ns.tol == pytest.approx(768 * float(np.finfo(np.float32).eps) * float(ns.singular_values[0]))
    from ns_plugin.models import wrap
    assert exact_nullspace(wrap(m, [0.5] * 3, [0.2, 0.3, 0.4]), space="pixel").nullity == 2  # diag(1/std) keeps it
    m.patch_embed.proj.weight.data = (u @ torch.diag(s) @ vh).reshape(768, 3, 16, 16)  # the same map in float64
    m.double()
    assert exact_nullspace(m, space="normalized").nullity == 2


def test_models_without_patch_projection_are_refused():
    with pytest.raises(NSPluginError, match="overlapping convolution.*approximate"):
        exact_nullspace(timm.create_model("resnet18"))
    with pytest.raises(NSPluginError, match="hybrid"):
        exact_nullspace(timm.create_model("vit_tiny_r_s16_p8_224", depth=1))
    with pytest.raises(NSPluginError, match="unknown timm model"):
        table1(["vit_does_not_exist"])


def test_full_rank_model_has_no_noise_to_sample():
    m = timm.create_model("vit_base_patch8_224", pretrained=False, depth=1)
    ns = exact_nullspace(m)
    assert ns.nullity == 0
    with pytest.raises(NSPluginError, match="nullity 0"):
        ns.sample(1)


def test_cli_table_and_figure(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ns_plugin", "nullspace", "vit_small_patch32_224",
                          "--figure", str(tmp_path / "fig2.png")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "2688" in out.stdout and (tmp_path / "fig2.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "ns_plugin", "nullspace", "resnet18"], capture_output=True, text=True)
    assert bad.returncode == 2 and "overlapping" in bad.stderr and "Traceback" not in bad.stderr
