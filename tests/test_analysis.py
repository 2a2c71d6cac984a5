"""Proposition 1 checks (arXiv:2403.10476 §3.2, appendix B) and the Jacobian analysis (arXiv:2401.15568) on real timm layers
and the trained embedded ViT."""

import pytest
import torch

from ns_plugin.analysis import jacobian as jm
from ns_plugin.analysis import proposition1 as p1
from ns_plugin.errors import NSPluginError


# ---------------------------------------------------------------- Proposition 1
def test_head_outputs_match_timm_attention():
    from timm.models.vision_transformer import Attention
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True).eval().double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    hm = p1.head_matrices(attn)
    heads = p1.head_outputs(hm, x)
    rebuilt = attn.proj(heads.transpose(1, 2).reshape(2, 9, 32))
    assert torch.allclose(rebuilt, attn(x), atol=1e-12)


def test_remark1_layer_satisfies_conditions_and_w_is_invariant():
    attn = p1.remark1_attention(64, 4, shared=(0, 1), seed=1)
    rep = p1.check_conditions(attn, tol=1e-6)
    assert rep["cond1"] and rep["cond2"] and rep["cond3"] and rep["holds"]
    assert max(rep["asymmetry"]) < 1e-6 and max(rep["rowspace_residual"]) < 1e-6
    assert rep["colinearity"]["m"] in (0, 1) and rep["colinearity"]["n"] in (0, 1)
    # heads 0 and 1 share a 16-dim row space: dim S = 48 and W lives in the other 16 dimensions
    assert rep["dim_S"] == 48 and rep["dim_S_perp"] == 16 and rep["admissible_dim"] == 16
    g = torch.Generator().manual_seed(0)
    w = p1.construct_w(attn, 17, method="proof", generator=g)
    assert float(w.norm()) > 1.0
    res = p1.verify_heads(attn, w, n_random=3, generator=g)
    assert res["rel_head_diff"] < 1e-6 and res["max_module_diff"] < 1e-5
    # the same-size perturbation along a random direction does change the heads
    r = torch.randn(64, generator=g, dtype=torch.float64)
    wr = w.norm(dim=1, keepdim=True) * (r / r.norm())
    assert p1.verify_heads(attn, wr, n_random=3, generator=g)["rel_head_diff"] > 1e-2


def test_broken_condition_is_reported_with_its_size():
    attn = p1.remark1_attention(64, 4, shared=(0, 1), seed=2)
    d = 64
    with torch.no_grad():  # replace head 2's value projection: its columns leave R(Q_2 K_2^T)
        attn.qkv.weight[2 * d + 32:2 * d + 48] = torch.randn(16, d, generator=torch.Generator().manual_seed(3))
    rep = p1.check_conditions(attn, tol=1e-6)
    assert rep["cond1"] and rep["cond3"] and not rep["cond2"] and not rep["holds"]
    assert rep["rowspace_residual"][2] > 0.5 and max(rep["rowspace_residual"][:2]) < 1e-6
    # the appendix-B W (from S^perp) now changes head 2: the proof needs condition 2
    w = p1.construct_w(attn, 9, method="proof", generator=torch.Generator().manual_seed(0))
    assert p1.verify_heads(attn, w, n_random=2)["rel_head_diff"] > 1e-3


def test_trained_vit_fails_conditions_and_reports_by_how_much(model):
    reports = p1.check_model(model, tol=1e-6, n_random=2, n_tokens=17)
    assert len(reports) == 4 and reports[0]["layer"].endswith("blocks.0.attn")
    for r in reports:
        assert not r["holds"]
        assert min(r["asymmetry"]) > 0.1 and min(r["rowspace_residual"]) > 0.1
        assert r["colinearity"]["residual"] > 0.1
        assert r["dim_S"] == 64 and r["admissible_dim"] == 0 and r["admissible_gap"] > 1e-3
        assert r["w_method"] == "admissible"
        # least-violating direction changes the heads less than a random one, but not by zero
        assert 1e-6 < r["verify"]["rel_head_diff"] < r["verify_random"]["rel_head_diff"]
    attn = model[1].blocks[0].attn
    with pytest.raises(NSPluginError, match="dim S = 64"):
        p1.construct_w(attn, 5, method="proof")


def test_proposition1_bad_inputs():
    import timm
    from timm.models.vision_transformer import Attention
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    with pytest.raises(NSPluginError, match="no timm-style attention"):
        p1.check_model(cnn)
    with pytest.raises(NSPluginError, match="not a timm-style attention"):
        p1.check_conditions(torch.nn.Linear(4, 4))
    rep = p1.check_conditions(Attention(32, num_heads=4, qk_norm=True))
    assert rep["qk_norm"] and not rep["holds"]
    with pytest.raises(NSPluginError, match="method"):
        p1.construct_w(p1.remark1_attention(32, 2, seed=0), 3, method="magic")


# ---------------------------------------------------------------- Jacobian (arXiv:2401.15568)
@pytest.fixture(scope="module")
def rep_and_x(trained, digits):
    f = jm.representation(trained[0], "pre_logits")
    x, y = digits.test.tensors
    return f, x[:4], y[:4]


def test_jacobian_matches_finite_differences_and_chunking(rep_and_x):
    f, x, _ = rep_and_x
    J = jm.jacobian(f, x[0], chunk_size=16)
    assert J.shape == (64, 3 * 32 * 32) and J.dtype == torch.float64
    J_all = jm.jacobian(f, x[0], chunk_size=None)
    assert torch.allclose(J, J_all, atol=1e-12)
    u = torch.randn(3 * 32 * 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = (u / u.norm()).reshape(1, 3, 32, 32)
    h = 1e-5
    fd = (f(x[:1].double() + h * u) - f(x[:1].double() - h * u))[0] / (2 * h)
    assert torch.allclose(fd, J @ u.flatten(), atol=1e-6 * float(fd.abs().max()) + 1e-9)


def test_jacobian_too_large_is_refused_with_the_size(rep_and_x):
    f, x, _ = rep_and_x
    need = 64 * 3072 * 8
    with pytest.raises(NSPluginError, match=f"{need:,} bytes"):
        jm.jacobian(f, x[0], max_bytes=need - 1)
    with pytest.raises(NSPluginError, match="one image"):
        jm.jacobian(f, x[:2])
    with pytest.raises(NSPluginError, match="chunk_size"):
        jm.jacobian(f, x[0], chunk_size=0)
    with pytest.raises(NSPluginError, match="kind"):
        jm.representation(torch.nn.Identity(), "tokens")


def test_null_and_normal_spaces_and_lipschitz(rep_and_x):
    f, x, _ = rep_and_x
    J = jm.jacobian(f, x[1])
    sp = jm.local_spaces(J, n_null=6, n_weak=3, generator=torch.Generator().manual_seed(1))
    rank = int(sp["rank"])
    assert 1 <= rank <= 64 and int(sp["null_dim"]) == 3072 - rank
    assert sp["null"].shape == (6, 3072)
    assert float((J @ sp["null"].T).abs().max()) < 1e-9 * float(sp["S"][0])   # truly in the null space
    assert torch.allclose(sp["null"].norm(dim=1), torch.ones(6, dtype=torch.float64))
    prof = jm.lipschitz_profile(f, x[1], J=J, n_top=4, n_random=6, n_null=6, eps=1e-3)
    s = prof["singular_values"]
    # Eq. 7 along the right singular vectors recovers the singular values (linear model of Eq. 5)
    for est, sv in zip(prof["L_singular"], s[:4]):
        assert abs(est - sv) < 0.1 * sv
    # null << random << top singular direction (arXiv:2401.15568 Figs 3-4)
    assert max(prof["L_null"]) < 1e-2 * min(prof["L_random"])
    assert max(prof["L_random"]) < prof["L_singular"][0]


def test_embedding_matching_and_interpolation(rep_and_x, trained):
    f, x, y = rep_and_x
    j = int((y != y[0]).nonzero()[0])
    res = jm.embedding_matching(f, x[0], x[j], steps=40, lr=0.01, classifier=trained[0], record_every=10)
    assert res["step"] == [0, 10, 20, 30, 40]
    assert res["loss"][-1] < 0.2 * res["loss"][0]
    assert res["cosine"][-1] > res["cosine"][0] + 0.3
    assert res["x"].min() >= 0 and res["x"].max() <= 1 and res["pixel_linf"][-1] > 0
    assert len(res["pred"]) == 5
    curve = jm.interpolation_curve(f, x[0], res["x"], n=5)
    assert curve["t"][0] == 0 and curve["t"][-1] == 1
    assert curve["cosine_to_a"][0] == pytest.approx(1) and curve["cosine_to_b"][-1] == pytest.approx(1)
    assert curve["cosine_to_b"][0] < curve["cosine_to_b"][-1]
    with pytest.raises(NSPluginError, match="exactly one"):
        jm.embedding_matching(f, x[0])
