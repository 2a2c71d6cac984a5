"""Watermarking with the exact patch-embedding nullspace (OpenReview:d8VrVfNARSy §6, Eq. 7, A.2)."""
import json

import pytest
import torch

from ns_plugin.applications.watermark import (evaluate_watermark, fit_watermark, psnr, read_image, solve_patches,
                                              text_watermark, watermark_figure, watermark_images, write_image)
from ns_plugin.errors import NSPluginError
from ns_plugin.models import build_default_model
from ns_plugin.nullspace.exact import exact_nullspace, verify_invariance


@pytest.fixture(scope="module")
def net():
    # invariance holds for any weights: a seeded untrained tiny ViT keeps this file fast
    return build_default_model(seed=0).eval()


@pytest.fixture(scope="module")
def ns(net):
    return exact_nullspace(net)


@pytest.fixture(scope="module")
def imgs(digits):
    return digits.test.tensors[0][:2]


@pytest.fixture(scope="module")
def wm(ns):
    return text_watermark("NS", ns.image_size, ns.in_chans)


def _patches(ns, x, w):
    X = ns.to_patches(x.double()).reshape(-1, ns.input_dim)
    W = ns.to_patches(w.double().expand(len(x), -1, -1, -1)).reshape(-1, ns.input_dim)
    return X, W


def test_p2_exact_matches_or_beats_slsqp(ns, imgs, wm):
    X, W = _patches(ns, imgs[:1], wm[None])
    k = [5, 6, 9]                                    # patches that contain part of the digit
    s = solve_patches(X[k], W[k], ns.basis, p=2, solver="slsqp")
    e = solve_patches(X[k], W[k], ns.basis, p=2, solver="exact")
    assert e["not_converged"] == 0 and e["duality_gap"] < 1e-7
    assert torch.all(e["objective"] <= s["objective"] + 1e-6 * (1 + s["objective"]))
    assert torch.allclose(e["objective"], s["objective"], rtol=1e-4)      # SLSQP solves this smooth QP well
    assert e["nullspace_residual"] < 1e-8 and e["box_violation"] == 0
    assert float(e["patches"].min()) >= 0 and float(e["patches"].max()) <= 1
    # moved towards the watermark
    assert torch.all(e["objective"] < (X[k] - W[k]).norm(dim=1))


def test_p1_interior_point_equals_highs_and_beats_slsqp(ns, imgs, wm):
    X, W = _patches(ns, imgs[:1], wm[None])
    k = list(range(4, 8))
    e = solve_patches(X[k], W[k], ns.basis, p=1, solver="exact")
    h = solve_patches(X[k], W[k], ns.basis, p=1, solver="highs")
    assert e["not_converged"] == 0 and h["not_converged"] == 0
    assert torch.allclose(e["objective"], h["objective"], atol=1e-6, rtol=1e-8)
    s = solve_patches(X[k[:1]], W[k[:1]], ns.basis, p=1, solver="slsqp", maxiter=30)
    assert float(e["objective"][0]) <= float(s["objective"][0]) + 1e-6
    for r in (e, h):
        assert r["nullspace_residual"] < 1e-8 and r["box_violation"] == 0


@pytest.mark.parametrize("p", [1, 2])
def test_recovers_a_reachable_watermark_exactly(ns, p):
    # a watermark that IS x + nullspace noise inside the box: the optimum is 0 and must be found
    g = torch.Generator().manual_seed(1)
    x = 0.25 + 0.5 * torch.rand(2, 3, 32, 32, generator=g)
    v = ns.sample(2, 1.0, generator=g, dtype=torch.float64)
    v = v * (0.2 / v.abs().amax())
    w = (x.double() + v)
    res = watermark_images(ns, x, w, p=p)
    assert float(res.objective.max()) < 1e-6
    assert torch.allclose(res.noise, v, atol=1e-6)


@pytest.mark.parametrize("p", [1, 2])
def test_watermarked_images_keep_the_output(net, ns, imgs, wm, p):
    res = watermark_images(net, imgs, wm, p=p)
    assert res.images.shape == imgs.shape and res.images.dtype == imgs.dtype
    assert float(res.images.min()) >= 0 and float(res.images.max()) <= 1
    assert res.coefficients.shape == (2, 16, ns.nullity)
    chk = verify_invariance(net, imgs, res.noise)
    assert chk["max_embed_diff"] < 1e-7 and chk["max_logit_diff"] < 1e-7 and chk["pred_match"] == 1.0
    # the images moved towards the watermark (A.2's PSNR against the watermark rises)
    assert torch.all(psnr(res.images, wm[None]) > psnr(imgs, wm[None]) + 1.0)
    q = evaluate_watermark(net, imgs, res.images, wm)
    assert q["pred_match"] == 100.0 and q["mean_abs_dprob_float64"] < 1e-6
    assert q["psnr_vs_watermark"] > q["psnr_original_vs_watermark"]


def test_bad_inputs(net, ns, imgs, wm):
    with pytest.raises(NSPluginError, match="resize"):
        watermark_images(net, imgs, torch.rand(3, 16, 16))
    with pytest.raises(NSPluginError, match="p must be 1 or 2"):
        watermark_images(net, imgs, wm, p=3)
    with pytest.raises(NSPluginError, match=r"\[0, 1\]"):
        watermark_images(net, imgs, wm * 2)
    with pytest.raises(NSPluginError, match=r"\[0, 1\]"):
        watermark_images(net, imgs * 2, wm)
    with pytest.raises(NSPluginError, match="unknown watermark solver"):
        watermark_images(net, imgs, wm, solver="adam")
    with pytest.raises(NSPluginError, match="p = 1"):
        watermark_images(net, imgs, wm, p=2, solver="highs")
    full = build_default_model(seed=0, embed_dim=192, num_heads=4).eval()   # 3*8*8 = 192 = d: full rank
    with pytest.raises(NSPluginError, match="nullity 0"):
        watermark_images(full, imgs, wm)
    # the documented size policy: watermarks are resized, channels repeated
    grey = torch.rand(1, 50, 70)
    out = fit_watermark(grey, 3, (32, 32))
    assert out.shape == (3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1


def test_files_and_figure(tmp_path, imgs, wm):
    p = write_image(tmp_path / "a.png", imgs[0])
    back = read_image(p)
    assert back.shape == (3, 32, 32) and (back - imgs[0]).abs().max() <= 0.5 / 255 + 1e-6
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(NSPluginError, match="cannot read"):
        read_image(tmp_path / "bad.png")
    f = watermark_figure(tmp_path / "fig.png", wm, imgs, imgs.flip(-1))
    assert f.is_file() and f.stat().st_size > 1000


def test_cli(tmp_path, net, capsys):
    from PIL import Image
    from ns_plugin.checkpoint import save_checkpoint
    from ns_plugin.cli import main

    ck = save_checkpoint(tmp_path / "m.pth", net)
    big = Image.new("RGB", (64, 40), "white")
    big.paste((0, 0, 0), (10, 10, 50, 30))
    big.save(tmp_path / "logo.png")
    out, fig = tmp_path / "w.png", tmp_path / "f.png"
    rc = main(["watermark", "digits:0", str(tmp_path / "logo.png"), "--checkpoint", str(ck), "--p", "2",
               "--out", str(out), "--figure", str(fig), "--save-tensor", str(tmp_path / "w.pt")])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file() and fig.is_file() and (tmp_path / "w.pt").is_file()
    assert "resized from 64x40 to 32x32" in text
    info = json.loads(text.strip().splitlines()[-1])
    assert info["pred_match"] == 100.0 and info["embedding_residual"] < 1e-6
    saved = torch.load(tmp_path / "w.pt", weights_only=True)
    chk = verify_invariance(net, saved["original"], saved["watermarked"] - saved["original"])
    assert chk["max_logit_diff"] < 1e-7
    # an image of the wrong size is refused, and nothing is written
    Image.new("RGB", (40, 40)).save(tmp_path / "img40.png")
    rc = main(["watermark", str(tmp_path / "img40.png"), "text:NS", "--checkpoint", str(ck),
               "--out", str(tmp_path / "no.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "40x40" in err and "refused" in err and not (tmp_path / "no.png").exists()
    rc = main(["watermark", "digits:0", "text:NS", "--checkpoint", str(ck), "--out", str(tmp_path / "x.jpg")])
    assert rc == 2 and "lossless" in capsys.readouterr().err
    rc = main(["watermark", "digits:0", str(tmp_path / "missing.png"), "--checkpoint", str(ck),
               "--out", str(tmp_path / "y.png")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
