"""Nullspace fingerprint of the patch embedding (OpenReview:d8VrVfNARSy §9, "model patenting")."""
import json

import pytest
import torch

from ns_plugin.applications.fingerprint import (DEFAULT_THRESHOLD, Fingerprint, compare, finetune, fingerprint,
                                                null_distribution, prune, reinit_head, similarity)
from ns_plugin.errors import NSPluginError
from ns_plugin.models import build_default_model


@pytest.fixture(scope="module")
def ref():
    return build_default_model(seed=0).eval()


@pytest.fixture(scope="module")
def data(digits):
    x, y = digits.train.tensors
    return x[:256], y[:256]


def test_same_and_reparametrised_weights_score_one(ref):
    m = compare(ref, build_default_model(seed=0).eval())
    assert m.derived and m.score > 0.999999
    # W -> M W (scaled, mixed embedding channels) has the same nullspace: same fingerprint
    other = build_default_model(seed=0).eval()
    conv = other[1].patch_embed.proj
    g = torch.Generator().manual_seed(3)
    mix = torch.eye(64) + 0.3 * torch.randn(64, 64, generator=g)
    with torch.no_grad():
        conv.weight.copy_((mix @ conv.weight.reshape(64, -1)).reshape_as(conv.weight) * 2.0)
    assert compare(ref, other).score > 0.999999


def test_unrelated_models_score_near_zero(ref):
    scores = [similarity(ref, build_default_model(seed=s).eval())["score"] for s in (1, 2, 3)]
    assert all(abs(s) < 0.1 for s in scores), scores
    assert not any(compare(ref, build_default_model(seed=s).eval()).derived for s in (1, 2))
    nul = null_distribution(192, 128, samples=50)
    assert abs(nul["mean"]) < 0.02 and nul["max"] < 0.1 < DEFAULT_THRESHOLD


def test_derived_models_are_detected(ref, data):
    x, y = data
    tuned = finetune(ref, x, y, steps=25, lr=5e-4, seed=1)
    assert not torch.equal(tuned[1].patch_embed.proj.weight, ref[1].patch_embed.proj.weight)
    for suspect in (tuned, prune(ref, 0.3), prune(ref, 0.5, scope="global"), reinit_head(ref, 1)):
        m = compare(ref, suspect)
        assert m.derived and m.score > DEFAULT_THRESHOLD, m
    # pruning more of the patch embedding lowers the score monotonically
    s = [similarity(ref, prune(ref, a))["score"] for a in (0.1, 0.3, 0.6)]
    assert s[0] > s[1] > s[2]


def test_geometry_mismatch_and_bad_models(ref):
    r = similarity(ref, build_default_model(seed=0, patch_size=16).eval())
    assert r["comparable"] is False and r["score"] == 0.0 and "patch geometry" in r["reason"]
    assert not compare(ref, build_default_model(seed=0, patch_size=16).eval()).derived
    with pytest.raises(NSPluginError, match="full rank"):
        fingerprint(build_default_model(seed=0, embed_dim=192).eval())
    with pytest.raises(NSPluginError, match="threshold"):
        compare(ref, ref, threshold=float("nan"))
    with pytest.raises(NSPluginError, match="not a nullspace fingerprint"):
        Fingerprint.from_dict({"x": 1})


def test_cli(tmp_path, ref, capsys):
    from ns_plugin.checkpoint import save_checkpoint
    from ns_plugin.cli import main

    a = save_checkpoint(tmp_path / "a.pth", ref)
    b = save_checkpoint(tmp_path / "b.pth", prune(ref, 0.2))
    c = save_checkpoint(tmp_path / "c.pth", build_default_model(seed=7))
    fp = tmp_path / "ref_fp.pt"
    assert main(["fingerprint", str(a), str(b), "--save-fingerprint", str(fp)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["derived"] is True and out["threshold"] == DEFAULT_THRESHOLD and out["score"] > 0.5
    assert fp.is_file()
    assert main(["fingerprint", str(fp), str(c)]) == 0          # a saved fingerprint as the reference
    text = capsys.readouterr().out
    out = json.loads(text.strip().splitlines()[-1])
    assert out["derived"] is False and "not derived" in text
    assert main(["fingerprint", str(a), str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert main(["fingerprint", str(a)]) == 2
    assert "SUSPECT" in capsys.readouterr().err
