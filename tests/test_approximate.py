"""Encoder-level ε-approximate nullspace noise (arXiv:2403.10476 Eq. 7-8, Alg. 1) on real timm models."""
import json
import socket

import pytest
import torch
from torch import nn

from ns_plugin.anatomy import anatomy, inject_noise, token_shape
from ns_plugin.errors import NSPluginError
from ns_plugin.models import build_default_model, wrap
from ns_plugin.nullspace.metrics import mse_probability, noise_quality
from ns_plugin.nullspace.regularized import learn_noise_regularized, lim_sweep
from ns_plugin.nullspace.search import search_input_noise, search_noise


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread is several times faster than two on a machine shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def searched(trained, digits):
    """One faithful-settings search (fresh U(-3, 3), AdamW 0.1, ε 0.03) on the trained default."""
    import copy
    model = copy.deepcopy(trained[0]).eval()
    x, _ = digits.train.tensors
    noise, rec = search_noise(model, x, generator=0)
    return model, noise, rec


def _deit():
    import timm
    net = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, num_classes=10)
    return wrap(net, (0.5,) * 3, (0.5,) * 3).eval()


def _block_input(model, x, noise=None):
    """Tokens entering the first transformer block (captured with a forward pre-hook)."""
    from ns_plugin.models import unwrap
    got = {}
    h = unwrap(model)[1].blocks[0].register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].detach()))
    try:
        with torch.no_grad(), inject_noise(model, noise):
            model(x)
    finally:
        h.remove()
    return got["x"]


# ------------------------------------------------------------------------------------------ anatomy
@pytest.mark.parametrize("kind", ["trained", "deit_distilled", "no_cls"])
def test_anatomy_consistent_and_noise_before_prefix_tokens(kind, model):
    net = {"trained": lambda: model, "deit_distilled": _deit,
           "no_cls": lambda: build_default_model(class_token=False, global_pool="avg", seed=0).eval()}[kind]()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = anatomy(net)
    with torch.no_grad():
        assert torch.allclose(a.head(a.encode(a.embed(x))), net(x), atol=1e-5)
    n_p, d = token_shape(net)
    assert a.embed(x).shape == (4, n_p, d)
    v = torch.randn(1, n_p, d, generator=torch.Generator().manual_seed(1))
    clean_in, noisy_in = _block_input(net, x), _block_input(net, x, v)
    k = a.num_prefix_tokens
    assert k == {"trained": 1, "deit_distilled": 2, "no_cls": 0}[kind]
    # cls/dist tokens untouched; every patch token moved by exactly the noise (position embedding comes after)
    assert torch.equal(clean_in[:, :k], noisy_in[:, :k])
    assert torch.allclose(noisy_in[:, k:] - clean_in[:, k:], v.expand(4, -1, -1), atol=1e-5)
    with torch.no_grad():
        split = a(x, v)
        with inject_noise(net, v):
            assert torch.allclose(net(x), split, atol=1e-5)
    # the hook is gone after the block, also after an exception inside it
    with pytest.raises(RuntimeError), inject_noise(net, v):
        raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.allclose(net(x), a(x), atol=1e-6)


def test_inject_noise_train_mode_gradients_and_ddp(model):
    import torch.distributed as dist
    x = torch.rand(4, 3, 32, 32)
    v = torch.zeros(1, *token_shape(model), requires_grad=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model.train())
        assert token_shape(ddp) == token_shape(model)
        with inject_noise(ddp, v):
            ddp(x).pow(2).sum().backward()
        assert v.grad is not None and v.grad.abs().sum() > 0
        assert model[1].patch_embed.proj.weight.grad is not None
        assert not model[1].patch_embed._forward_hooks
    finally:
        dist.destroy_process_group()
    with inject_noise(model, None):  # None is a no-op
        pass


def test_anatomy_errors(model):
    import timm
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=10)
    for call in (lambda: anatomy(cnn), lambda: token_shape(cnn), lambda: search_noise(cnn, torch.rand(2, 3, 32, 32))):
        with pytest.raises(NSPluginError, match="patch_embed.*input-level"):
            call()
    with pytest.raises(NSPluginError, match=r"\(1, 3, 64\).*\(1, 16, 64\)"):
        with inject_noise(model, torch.zeros(1, 3, 64)):
            pass
    with pytest.raises(NSPluginError, match="NaN"):
        with inject_noise(model, torch.full((1, 16, 64), float("nan"))):
            pass


# ------------------------------------------------------------------------------------------- search
def test_search_reaches_eps_and_keeps_predictions(searched, digits):
    model, noise, rec = searched
    assert noise.shape == (1, 16, 64) and torch.isfinite(noise).all()
    assert rec.reached and rec.mse_prob < 0.03 == rec.eps and rec.init == "uniform" and rec.mode == "fast"
    assert 0 < rec.steps <= 3000 and rec.checks == rec.steps + 1 == len(rec.history)
    assert rec.history[-1] == rec.mse_prob and all(h >= 0.03 for h in rec.history[:-1])
    assert len(rec.losses) == rec.steps and rec.losses[-1] < rec.losses[0]
    assert rec.norm == pytest.approx(float(noise.norm()))
    assert rec.norm < rec.init_norm  # started large, descended to the boundary (Eq. 8)
    xt, yt = digits.test.tensors
    q = noise_quality(model, noise, xt, yt, generator=0)
    assert q["pred_match"] >= 80
    assert q["permuted_pred_match"] < q["pred_match"] - 30  # the learnt directions matter (Fig. 3)
    assert q["permuted_mse_prob"] > 5 * q["mse_prob"]
    assert q["mse_prob"] == pytest.approx(mse_probability(model, xt, noise), rel=1e-5)
    assert abs(q["clean_acc"] - q["noisy_acc"]) < 10


@pytest.mark.parametrize("eps,max_steps", [(0.5, 200), (0.03, 12)])
def test_faithful_and_fast_give_the_same_noise(model, digits, eps, max_steps):
    x, _ = digits.train.tensors
    res = [search_noise(model, x[:512], eps=eps, max_steps=max_steps, generator=3, mode=m) for m in ("faithful", "fast")]
    (v1, r1), (v2, r2) = res
    assert r1.steps == r2.steps and r1.reached == r2.reached == (eps == 0.5)
    assert torch.equal(v1, v2)
    assert r1.history == r2.history


def test_warm_start_and_expansion_reach_eps_near_the_boundary(searched, digits):
    model, noise, rec = searched
    x, _ = digits.train.tensors
    v, r = search_noise(model, x, init=noise, generator=1)
    assert r.init == "warm" and r.reached and r.steps < rec.steps
    assert 0.7 * rec.norm < r.norm < 1.3 * rec.norm
    # a small previous noise is first expanded (×1.1 while inside), then brought back to the boundary
    v, r = search_noise(model, x, init=0.25 * noise, generator=2)
    assert r.expansions >= 5 and r.reached and r.init_norm > 0.25 * rec.norm * 1.1 ** 5 - 1e-3
    assert r.norm > 0.35 * rec.norm  # the single-batch stop test puts the boundary at ~0.4-1x along v
    assert mse_probability(model, x, v) > 1.5 * mse_probability(model, x, 0.25 * noise)  # moved outwards
    v, r = search_noise(model, x, init=0.25 * noise, generator=2, expand=None, max_steps=5)
    assert r.expansions == 0 and r.steps == 0 and r.norm == pytest.approx(0.25 * rec.norm, rel=1e-5)


def test_search_restores_model_state_and_leaves_no_grads(model, digits):
    x, _ = digits.train.tensors
    model.train()
    model[1].head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: t.clone() for k, t in model.state_dict().items()}
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:96], torch.zeros(96)), batch_size=32)
    v, r = search_noise(model, loader, max_steps=4, eps=1e-6)
    assert r.steps == 4 and not r.reached
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())


def test_bad_inputs(model, digits):
    x, _ = digits.train.tensors[0][:64], None
    for kw, msg in [(dict(eps=0), "eps"), (dict(eps=-1), "eps"), (dict(lim=0), "lim"), (dict(lr=-0.1), "lr"),
                    (dict(mode="slow"), "mode"), (dict(expand=0.5), "expand"),
                    (dict(init=torch.zeros(1, 4, 64)), r"\(1, 4, 64\).*\(1, 16, 64\)"),
                    (dict(init=torch.full((1, 16, 64), float("inf"))), "NaN or inf")]:
        with pytest.raises(NSPluginError, match=msg):
            search_noise(model, x, **kw)
    with pytest.raises(NSPluginError, match=r"\[0, 1\]"):
        search_noise(model, x * 3)
    with pytest.raises(NSPluginError, match="one-shot"):
        search_noise(model, iter([x]))
    with pytest.raises(NSPluginError, match="diverged"):
        search_noise(model, x, lr=1e30, eps=1e-12, max_steps=20)
    with pytest.raises(NSPluginError, match=r"\(1, 16, 63\)"):
        noise_quality(model, torch.zeros(1, 16, 63), x)
    assert all(p.requires_grad for p in model.parameters()) and not model.training


# ---------------------------------------------------------------------- variants, algebra, transfer
def test_input_level_noise_for_a_cnn(digits):
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    x, _ = digits.train.tensors
    v, r = search_input_noise(cnn, x[:256], lim=0.5, eps=0.01, generator=0, max_steps=50)
    assert v.shape == (1, 3, 32, 32) and r.level == "input" and torch.isfinite(v).all()
    assert r.mse_prob == r.history[-1] and r.reached == (r.mse_prob < 0.01)
    q = noise_quality(cnn, v, x[:128])
    assert q["norm"] == pytest.approx(r.norm) and q["n"] == 128
    # an eps-noise keeps most predictions; its permuted control (same values, shuffled) is the comparison
    assert q["mse_prob"] == pytest.approx(mse_probability(cnn, x[:128], v), rel=1e-6)


def test_regularized_objective_and_lim_sweep(model, digits):
    x, _ = digits.train.tensors
    xt, yt = digits.test.tensors
    v0, r0 = learn_noise_regularized(model, x[:256], lam=0.0, lim=0.5, steps=8, generator=0)
    v1, r1 = learn_noise_regularized(model, x[:256], lam=50.0, lim=0.5, steps=8, generator=0)
    assert r0.steps == 8 and r0.objective.startswith("eq4") and len(r0.losses) == 8
    assert r1.norm > r0.norm  # the -λ·log‖v‖ term pushes the norm up (Eq. 4)
    rows = lim_sweep(model, x[:256], xt[:128], yt[:128], lims=(0.05, 2.0), steps=5)
    assert [r["lim"] for r in rows] == [0.05, 2.0]
    assert rows[1]["norm"] > 10 * rows[0]["norm"]
    assert rows[0]["pred_match"] >= rows[1]["pred_match"] and {"permuted_pred_match", "noisy_acc"} <= set(rows[0])


def test_algebra_plots_and_transfer(searched, digits, tmp_path):
    from ns_plugin.nullspace.algebra import (convex_grid, plot_convex_grid, plot_scale_influence, scale_influence,
                                             transfer_noise)
    model, noise, _ = searched
    xt, yt = digits.test.tensors[0][:128], digits.test.tensors[1][:128]
    other = noise[:, torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    s = scale_influence(model, [noise, other], xt, alphas=[0, 0.5, 1, 2])
    assert s["mse_prob"][0] == 0 and s["pred_match"][0] == 100 and s["mse_prob"][3] > s["mse_prob"][1]
    g = convex_grid(model, [noise, other], xt, pairs=1, step=0.5, generator=0)
    assert g["alphas"] == [0, 0.5, 1.0] and len(g["grid"]) == 3 and g["grid"][0][0] == 0
    (i, j), = g["pairs"]
    vs = [noise, other]
    assert g["grid"][2][0] == pytest.approx(mse_probability(model, xt, vs[i]), rel=1e-4)
    assert g["grid"][1][1] == pytest.approx(mse_probability(model, xt, 0.5 * (vs[i] + vs[j])), rel=1e-4)
    p1 = plot_scale_influence(s, tmp_path / "a.png", eps=0.03)
    p2 = plot_convex_grid(g, tmp_path / "b.png", eps=0.03)
    assert p1.read_bytes()[:4] == p2.read_bytes()[:4] == b"\x89PNG"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.png", "b.png"]
    fresh = build_default_model(seed=5).eval()
    q = transfer_noise(noise, fresh, xt, yt)
    assert set(q) >= {"pred_match", "permuted_pred_match", "mse_prob"}
    with pytest.raises(NSPluginError, match=r"\(1, 16, 64\).*\(1, 4, 192\)"):
        transfer_noise(noise, _deit(), xt)


def test_cli_noise(trained, digits, tmp_path, capsys):
    from ns_plugin.checkpoint import save_checkpoint
    from ns_plugin.cli import main
    ckpt = save_checkpoint(tmp_path / "m.pth", trained[0]) or tmp_path / "m.pth"
    out = tmp_path / "noise.pt"
    assert main(["noise", "--checkpoint", str(ckpt), "--eps", "0.5", "--max-steps", "30", "--out", str(out),
                 "--plot", str(tmp_path / "fig"), "--num-noises", "2", "--grid-step", "0.5", "--eval-limit", "100"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["record"]["reached"] and last["quality"]["n"] == 100
    saved = torch.load(out, weights_only=True)
    assert saved["noise"].shape == (1, 16, 64) and saved["record"]["steps"] == last["record"]["steps"]
    assert {p.name for p in (tmp_path / "fig").iterdir()} == {"scale_influence.png", "convex_grid.png"}
    from ns_plugin.data import save_image_folder
    folder = save_image_folder(tmp_path / "imgs", *[t[:12] for t in digits.test.tensors])
    assert main(["noise", "--checkpoint", str(ckpt), "--data", str(folder), "--eps", "0.5", "--max-steps", "3",
                 "--batch-size", "8"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["quality"]["n"] == 12 and "noisy_acc" in last["quality"] and last["record"]["steps"] <= 3
    bad = tmp_path / "bad.pt"
    assert main(["noise", "--checkpoint", str(ckpt), "--eps", "0", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "error: argument --eps: value must be" in err and not bad.exists()


def test_search_batches_over_a_worker_dataloader_are_freed_without_the_cyclic_gc(model, digits):
    """The noise search's batch stream holds no reference cycle: when the search drops it, the partly consumed
    DataLoader iterator (and its worker processes) goes at once, not later in whatever process the cyclic
    collector runs in (a forked DataLoader worker of the evaluation: "AssertionError: can only test a child
    process" on stderr)."""
    import gc
    import weakref

    from torch.utils.data import DataLoader, Dataset

    from ns_plugin.nullspace._common import _Batches

    x = digits.train.tensors[0][:16]

    class Images(Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i]

    gc.disable()
    try:
        b = _Batches(DataLoader(Images(), batch_size=4, num_workers=1), model, 4, None)
        assert next(b).shape == (4, *x.shape[1:])
        stream = weakref.ref(b._it)
        del b
        assert stream() is None
    finally:
        gc.enable()
