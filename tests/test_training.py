"""Training: one loop, seven methods, EasyRobust-style configs, resume after SIGKILL, bad input.

Small runs on a subset of the embedded digits with the trained tiny ViT (real timm, torchattacks,
EasyRobust VQGAN and pgd_generator, real noise search)."""
import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ns_plugin.errors import NSPluginError

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread", "default_model_cache")
METHODS = ["standard", "ns", "random", "random_norm", "madry", "trades", "dat", "dat_ns"]
# tiny but real: 2 rounds x 2 steps on 48 training images, 16-image noise search
SMALL = dict(rounds=2, steps_per_round=2, batch_size=8, train_limit=48, search_batch_size=16, lr=1e-4,
             pgd_steps=2, progress=False, plot=False)


@pytest.fixture
def model():
    """A fresh copy of the cached trained embedded default (what ``model: default`` configs train)."""
    from ns_plugin.embedded import default_model
    return copy.deepcopy(default_model(progress=False)[0]).eval()


def _cfg(**kw):
    from ns_plugin.training import load_config
    d = dict(SMALL)
    d.update(kw)
    return load_config(**d)


def _small_set(digits, n=48):
    from torch.utils.data import TensorDataset
    x, y = digits.train.tensors
    return TensorDataset(x[:n], y[:n])


def test_registry_lists_every_method_and_unknown_names_fail():
    from ns_plugin.training import trainers
    import ns_plugin.training  # noqa: F401  (registers)
    assert set(METHODS) <= set(trainers.names())
    with pytest.raises(NSPluginError, match=r"unknown trainer 'nss'.*did you mean 'ns'.*known: .*dat_ns.*trades"):
        _cfg(method="nss")


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_through_the_shared_loop(method, model, digits):
    from ns_plugin.training import train
    before = copy.deepcopy(model.state_dict())
    s = train(_cfg(method=method), model=model, train_set=_small_set(digits))
    log = s["log"]
    assert [r["round"] for r in log] == [1, 2] and log[-1]["step"] == 4 and s["steps"] == 4
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    changed = [k for k, v in s["model"].state_dict().items() if not torch.equal(v, before[k])]
    assert "1.head.weight" in changed and "1.patch_embed.proj.weight" in changed
    if method in ("ns", "dat_ns"):
        for r in log:  # the noise entered the eps region every round, and it is a large noise
            assert r["reached"] and r["mse_prob"] < 0.03 and r["noise_norm"] > 1.0
            assert r["warm_start"] is False            # Alg. 1 line 3 by default: fresh U(-lim, lim)
            assert 0 <= r["heldout_mse_prob"] <= 2     # logged next to the stopping batch's value
        assert "ce_noise" in log[-1]
    if method == "random":  # arXiv:2403.10476 Table 4 as the paper does it: N(0, 1) shrunk x0.8 until below eps
        for r in log:
            assert r["mse_prob"] < 0.03 and r["random_shrinks"] >= 0 and "heldout_mse_prob" in r
            assert r["noise_norm"] == pytest.approx(32 * 0.8 ** r["random_shrinks"], rel=0.15)  # |N(0,1)| ~ sqrt(16*64)
    if method == "random_norm":  # the other experiment: random direction, same norm as the learnt noise
        for r in log:
            assert r["noise_norm"] == pytest.approx(r["learnt_noise_norm"], rel=1e-4)
            assert r["learnt_mse_prob"] < 0.03 and r["mse_prob"] > r["learnt_mse_prob"]
    if method in ("dat", "dat_ns"):
        assert "ce_dat" in log[-1]
    if method == "trades":
        assert log[-1]["kl_adv"] >= 0


def test_ns_noise_is_the_searched_noise_and_enters_the_loss(model, digits):
    """The NS loss is CE(clean) + CE(clean + noise) with the noise of this round."""
    import torch.nn.functional as F
    from ns_plugin.anatomy import inject_noise
    from ns_plugin.training.loop import Trainer
    t = Trainer(_cfg(method="ns", rounds=1, steps_per_round=1), model=model, train_set=_small_set(digits))
    stats = t.method.begin_round(t, 0)
    noise = t.method.noise
    assert noise.shape[0] == 1 and float(noise.norm()) == pytest.approx(stats["noise_norm"], rel=1e-5)
    x, y = _small_set(digits).tensors
    x, y = x[:8], y[:8]
    loss, parts = t.method.loss(t, x, y)
    with torch.no_grad(), inject_noise(t.model, noise):
        want = F.cross_entropy(t.model(x), y)
    assert parts["ce_noise"] == pytest.approx(float(want), rel=1e-5)
    assert float(loss) == pytest.approx(parts["ce_clean"] + parts["ce_noise"], rel=1e-5)
    assert parts["ce_noise"] != pytest.approx(parts["ce_clean"], rel=1e-3)


def test_random_noise_is_eps_noise_on_the_search_batch(model, digits):
    """The paper's ablation: the random noise's MSE probability on the round's search batch is below eps,
    measured independently of the method's own log."""
    from ns_plugin.nullspace.metrics import mse_probability
    from ns_plugin.training.loop import Trainer
    t = Trainer(_cfg(method="random", rounds=1, steps_per_round=1), model=model, train_set=_small_set(digits))
    row = t.method.begin_round(t, 0)
    got = mse_probability(t.raw, t.search_images(0), t.method.noise)
    assert got < 0.03 and got == pytest.approx(row["mse_prob"], rel=1e-4)
    assert got > 0                                    # a real noise, not zero
    before = t.method.noise / 0.8                     # the previous shrink was still outside (or no shrink)
    assert row["random_shrinks"] == 0 or mse_probability(t.raw, t.search_images(0), before) >= 0.03


def test_warm_start_is_opt_in_and_confirm_rule_logs(model, digits):
    from ns_plugin.training import train
    s = train(_cfg(method="ns", warm_start=True, stop_confirm_batches=2), model=model, train_set=_small_set(digits))
    log = s["log"]
    assert [r["warm_start"] for r in log] == [False, True]
    for r in log:   # with the confirm rule the noise is below eps on 2 x 16 fixed training images too
        assert r["confirm_mse_prob"] < 0.03 and r["mse_prob"] < 0.03
    assert _cfg().warm_start is False and _cfg(warm_start=None).warm_start is False


def test_config_yaml_flags_precedence_and_ranges(tmp_path):
    from ns_plugin.training.config import parse_config, load_config
    f = tmp_path / "c.yaml"
    f.write_text("method: trades\nrounds: 3\ntrades-beta: 2.5\neps: 0.05\n")
    cfg = parse_config(["--config", str(f), "--rounds", "7", "--model-ema", "--clip-grad", "1.5"])
    assert (cfg.method, cfg.rounds, cfg.trades_beta, cfg.eps, cfg.model_ema, cfg.clip_grad) == \
        ("trades", 7, 2.5, 0.05, True, 1.5)
    assert cfg.lr == 1e-5 and cfg.steps_per_round == 40 and cfg.noise_lr == 0.1 and cfg.lim == 3.0
    assert cfg.pgd_eps == pytest.approx(8 / 255) and cfg.pgd_alpha == pytest.approx(2 / 255)
    for path in sorted((ROOT / "benchmarks" / "configs").glob("*.yaml")):
        assert load_config(str(path)).method == path.stem
    assert {p.stem for p in (ROOT / "benchmarks" / "configs").glob("*.yaml")} >= set(METHODS)
    with pytest.raises(NSPluginError, match=r"^eps must be a finite number in \(0, 2\], got 0.0 \(out of range\)"):
        load_config(eps=0.0)
    with pytest.raises(NSPluginError, match=r"^eps must be .*got 5.0 \(out of range\)"):
        load_config(eps=5.0)
    with pytest.raises(NSPluginError, match=r"^lr must be .*got -1e-05 \(out of range\)"):
        load_config(lr=-1e-5)
    with pytest.raises(NSPluginError, match=r"^noise_lr must be .*got 0.0 \(out of range\)"):
        load_config(noise_lr=0.0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("methd: ns\n")
    with pytest.raises(NSPluginError, match=r"unknown key\(s\) \['methd'\]"):
        load_config(str(bad))


def _ns_cli(*args):
    from ns_plugin.cli import main
    return main(["train", *map(str, args)])


def test_cli_outputs_safe_checkpoints_log_and_plot_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: standard\nrounds: 2\nsteps_per_round: 2\nbatch_size: 8\ntrain_limit: 32\n"
                   "probe: true\nprobe_size: 32\nprogress: false\nmodel_ema: true\n")
    assert _ns_cli("--config", cfg, "--out", out, "--lr", "1e-4") == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line)["steps"] == 4
    for name in ("last.pth", "model.pth", "log.csv", "log.json", "fig4.png"):
        assert (out / name).is_file(), name
    final = torch.load(out / "model.pth", weights_only=True)
    last = torch.load(out / "last.pth", weights_only=True)
    assert set(final) >= {"state_dict", "state_dict_ema", "meta"} and final["meta"]["method"] == "standard"
    assert {"optimizer", "scheduler", "rng", "method_state", "stream"} <= set(last)
    from ns_plugin.checkpoint import load_checkpoint
    from ns_plugin.models import build_default_model
    load_checkpoint(out / "model.pth", build_default_model(), use_ema=True)
    rows = json.loads((out / "log.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2] and "probe_fgsm_acc" in rows[0]
    assert (out / "log.csv").read_text().splitlines()[0].startswith("round,step,method")

    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    cases = [
        (["--config", cfg, "--out", out], "already holds a training run; pass --resume"),
        (["--config", cfg, "--out", out, "--resume", "--method", "ns"], "is a 'standard' run but this is 'ns'"),
        (["--config", cfg, "--out", out, "--resume", "--model", "resnet18", "--num-classes", "10"],
         "saved for another architecture"),
        (["--config", cfg, "--out", out, "--resume", "--world-size", "2"], "expects world_size 2 but the launch has 1"),
        (["--config", cfg, "--out", tmp_path / "new", "--method", "fancy"], "unknown trainer 'fancy'"),
        (["--config", cfg, "--out", tmp_path / "new", "--eps", "-1"], "--eps: value must be a finite number in (0, 2], got '-1'"),
        (["--config", cfg, "--out", tmp_path / "new", "--lr", "7"], "--lr: value must be a finite number in (0, 1], got '7'"),
        (["--config", cfg, "--out", tmp_path / "new2", "--resume"], "nothing to resume"),
    ]
    for argv, msg in cases:
        assert _ns_cli(*argv) == 2, argv
        assert msg in capsys.readouterr().err, argv
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    assert not (tmp_path / "new").exists() and not (tmp_path / "new2").exists()


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, digits):
    """A run killed with SIGKILL mid-round and resumed ends with exactly the weights of an uninterrupted run
    (NS: the noise, optimiser, scheduler, EMA, data position and RNG states all come back)."""
    from ns_plugin.checkpoint import read_checkpoint
    cfg = tmp_path / "ns.yaml"
    cfg.write_text("method: ns\nrounds: 4\nsteps_per_round: 3\nbatch_size: 8\ntrain_limit: 48\n"
                   "search_batch_size: 16\nlr: 1.0e-4\nmodel_ema: true\nwarm_start: true\nprogress: false\n"
                   "plot: false\n")
    # same thread count in the subprocesses as here, so float results can be compared exactly
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    killed = tmp_path / "killed"
    # the run kills itself (SIGKILL) at a fixed point: right after round 2's checkpoint is written and the
    # first model step of round 3 is taken (a hook, not a race against a polling test)
    kill_mid_round = (
        "import os, signal, sys\n"
        "from ns_plugin.training import loop\n"
        "_step = loop.Trainer.step\n"
        "def step(self, x, y):\n"
        "    out = _step(self, x, y)\n"
        "    if self.round == 2 and self.stream.batches == 2 * 3 + 1:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return out\n"
        "loop.Trainer.step = step\n"
        "from ns_plugin.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", kill_mid_round, "train", "--config", str(cfg), "--out", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-500:]
    assert read_checkpoint(killed / "last.pth")["meta"]["round"] == 2
    assert not (killed / "model.pth").exists()
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]
    cmd = [sys.executable, "-m", "ns_plugin", "train", "--config", str(cfg)]
    r = subprocess.run(cmd + ["--out", str(killed), "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    full = tmp_path / "full"   # the uninterrupted run, in this process
    from ns_plugin.training import load_config, train
    train(load_config(str(cfg)), full)
    a, b = read_checkpoint(killed / "model.pth"), read_checkpoint(full / "model.pth")
    for key in ("state_dict", "state_dict_ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    la, lb = (json.loads((d / "log.json").read_text()) for d in (killed, full))
    assert [r["noise_norm"] for r in la] == [r["noise_norm"] for r in lb]


def test_train_one_epoch_entry_for_easyrobust_scripts(model, digits):
    """EasyRobust's/timm's train_one_epoch signature, with timm's NativeScaler-free path and ModelEmaV2."""
    import argparse
    from timm.utils import ModelEmaV2
    from ns_plugin.integrations.easyrobust import train_one_epoch
    x, y = _small_set(digits, 32).tensors
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    args = argparse.Namespace(ns_method="ns", steps_per_round=2, search_batch_size=8, clip_grad=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = ModelEmaV2(model, decay=0.9)
    before = model[1].head.weight.detach().clone()
    m = train_one_epoch(0, model, loader, opt, torch.nn.CrossEntropyLoss(), args, model_ema=ema)
    assert set(m) == {"loss"} and torch.isfinite(torch.tensor(m["loss"]))
    assert not torch.equal(before, model[1].head.weight)
    method = args._ns_plugin_method[2]
    assert method.noise is not None and float(method.noise.norm()) > 0
    args.ns_method = "nope"
    with pytest.raises(NSPluginError, match="unknown trainer 'nope'"):
        train_one_epoch(1, model, loader, opt, None, args)
