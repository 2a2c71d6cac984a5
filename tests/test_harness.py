"""The comparison harness behind `ns-plugin demo`: config checks, results-folder ownership, interruption
and resume, and the outputs (tables, leaderboard JSON, timm registration) on a tiny real run."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from ns_plugin.errors import NSPluginError

pytestmark = pytest.mark.usefixtures("default_model_cache")

TINY = {
    "name": "tiny",
    "base": "demo",
    "seeds": [0],     # one seed: the single-seed layout (tests/test_seeds.py covers several)
    "training": {"rounds": 1, "steps_per_round": 2, "batch_size": 16, "search_batch_size": 16,
                 "noise_max_steps": 30, "plot": False},
    "runs": [{"name": "ViT", "method": None}, {"name": "ViT + FT", "method": "standard"},
             {"name": "ViT + NS", "method": "ns"}],
    "eval": {"n_attack": 8, "cw": {"c": 1.0, "steps": 3, "lr": 0.01}, "patchfool": {"patches": 1, "steps": 3},
             "corruptions": ["gaussian_noise", "contrast"], "severities": [1, 5], "surrogate_sets": False},
    "tables": {"table2": ["ViT", "ViT + NS"], "table3": ["ViT", "ViT + FT", "ViT + NS"]},
}


def test_config_errors_are_one_line():
    from ns_plugin.evaluation.harness import load_comparison_config
    with pytest.raises(NSPluginError, match="unknown key 'rnus'.*did you mean 'runs'"):
        load_comparison_config(None, rnus=[])
    with pytest.raises(NSPluginError, match="unknown trainer 'nss'"):
        load_comparison_config(None, runs=[{"name": "a", "method": "nss"}], tables={})
    with pytest.raises(NSPluginError, match="unknown key 'epz' in run"):
        load_comparison_config(None, runs=[{"name": "a", "method": "ns", "epz": 0.1}], tables={})
    with pytest.raises(NSPluginError, match="not in runs"):
        load_comparison_config(None, runs=[{"name": "a", "method": None}], tables={"table2": ["b"]})
    with pytest.raises(NSPluginError, match="unknown key 'fgsm' in eval"):
        load_comparison_config(None, eval={"fgsm": 1})


def test_yaml_configs_in_benchmarks_are_valid():
    import glob
    from ns_plugin.evaluation.harness import load_comparison_config
    files = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "configs", "compare", "*.yaml")))
    assert len(files) >= 5
    for f in files:  # the ImageNet configs name a data folder of another machine: paths are checked at run time
        assert load_comparison_config(f, check_paths=False)["runs"]


#: ``ns-plugin`` with a deterministic Ctrl-C: the process sends itself SIGINT right after the first model's
#: evaluation is written (instead of polling the folder from outside and racing the run).
CTRL_C_AFTER_FIRST_EVAL = """
import os, signal, sys
from ns_plugin.evaluation import harness
_evaluate = harness.Comparison.evaluate
def evaluate(self, *a, **k):
    out = _evaluate(self, *a, **k)
    os.kill(os.getpid(), signal.SIGINT)
    return out
harness.Comparison.evaluate = evaluate
from ns_plugin.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(cfg_path, out, *, ctrl_c_after_first_eval=False, **kw):
    cmd = ["-c", CTRL_C_AFTER_FIRST_EVAL] if ctrl_c_after_first_eval else ["-m", "ns_plugin"]
    # a child of a non-interactive shell may inherit SIGINT as ignored; restore the default so Ctrl-C works
    return subprocess.Popen([sys.executable, *cmd, "demo", "--config", str(cfg_path), "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def test_tiny_comparison_interrupt_resume_and_outputs(tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "res"
    env = dict(os.environ)
    # interrupt (Ctrl-C) once the first model's evaluation is on disk
    p = _run(cfg_path, out, ctrl_c_after_first_eval=True, env=env)
    stdout, stderr = p.communicate(timeout=600)
    assert (out / "evals" / "vit.json").is_file(), stderr[-2000:]
    assert p.returncode == 130, stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["status"] == "partial"
    if (out / "tables.md").is_file():
        assert "PARTIAL" in (out / "tables.md").read_text()
    first = json.loads((out / "evals" / "vit.json").read_text())
    # resume: the same command finishes the run, reusing what exists
    p = _run(cfg_path, out, env=env)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert json.loads((out / "evals" / "vit.json").read_text()) == first
    tables = (out / "tables.md").read_text()
    assert "Table 2" in tables and "Table 3" in tables and "PARTIAL" not in tables
    rows = json.loads((out / "rows.json").read_text())
    assert rows["ViT"]["C"] == pytest.approx(100.0)  # the baseline's mCE against itself
    for name, r in rows.items():
        ev = json.loads((out / "evals" / f"{name.lower().replace(' ', '_').replace('+', '_')}.json").read_text())
        assert 0 <= r["PGD"] <= r["FGSM"] + 1e-9 and r["FGSM"] <= ev["clean_attack_subset"] + 1e-9, name
    # robustbench's layout <dataset>/<threat>/<Name>.json; no AutoAttack in this config, so no Linf board
    lb = json.loads((out / "leaderboard" / "digits" / "corruptions" / "ViT___NS.json").read_text())
    for field in ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                  "architecture", "eps", "clean_acc", "corruptions_acc"):
        assert field in lb
    assert lb["dataset"] == "digits" and isinstance(lb["clean_acc"], str) and float(lb["corruptions_acc"]) > 0
    assert "corruptions_mce" not in lb and "not to AlexNet" in lb["footnote"]
    assert not (out / "leaderboard" / "digits" / "Linf").exists()
    assert 'id="digits_leaderboard_corruptions"' in (out / "leaderboard" / "index.html").read_text()
    assert (out / "table2.csv").read_text().startswith("Method,Clean")
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert set(summary["rows"]) == {"ViT", "ViT + FT", "ViT + NS"}
    # a different config in the same folder is refused, nothing is touched
    other = dict(TINY, name="other")
    cfg2 = tmp_path / "other.yaml"
    cfg2.write_text(yaml.safe_dump(other))
    before = (out / "run.json").read_text()
    p = _run(cfg2, out)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "holds another run" in err and "Traceback" not in err
    assert (out / "run.json").read_text() == before
    # evaluation is a function of config + seed: evaluate the NS model again, here, in another process with
    # another RNG history (every attack, incl. PatchFool's and PGD's random starts, and CW)
    from ns_plugin.evaluation.harness import load_comparison_config, run_comparison
    torch.manual_seed(12345)
    torch.rand(77)
    ev_path = out / "evals" / "vit___ns.json"
    old_eval = json.loads(ev_path.read_text())
    tables_csv = {t: (out / t).read_text() for t in ("table2.csv", "table3.csv", "tables.md", "rows.json")}
    ev_path.unlink()
    run_comparison(load_comparison_config(cfg_path), out, progress=False, log=lambda *a: None)
    new_eval = json.loads(ev_path.read_text())
    timing = lambda d: {k: v for k, v in d.items() if not (k.endswith("_per_s") or k.endswith("_seconds"))}  # noqa: E731
    assert timing(new_eval) == timing(old_eval)
    assert {t: (out / t).read_text() for t in tables_csv} == tables_csv   # identical tables, byte for byte
    assert (out / "cost.md").is_file()


def test_a_comparison_failing_after_it_started_says_failed_in_run_json(tmp_path, monkeypatch):
    from ns_plugin.evaluation import harness

    def broken(self):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(harness.Comparison, "data", broken)   # a fault injected after the folder is claimed
    cfg = harness.load_comparison_config(None, **{k: v for k, v in TINY.items() if k != "tables"},
                                         tables={})
    with pytest.raises(RuntimeError):
        harness.run_comparison(cfg, tmp_path / "res", progress=False, log=lambda *a: None)
    state = json.loads((tmp_path / "res" / "run.json").read_text())
    assert state["status"] == "failed" and state["error"] == "RuntimeError: disk on fire", state
    assert not (tmp_path / "res" / ".ns_plugin.lock").exists()


def test_rows_trained_with_ema_are_evaluated_with_their_ema_weights(tmp_path):
    """The row that trains with ``model_ema`` is evaluated with its EMA weights and says so; the others with
    their own; ``eval.use_ema: false`` evaluates the raw weights of the same checkpoint."""
    from ns_plugin.data import load_digits
    from ns_plugin.evaluation.harness import load_comparison_config, run_comparison
    from ns_plugin.models import accuracy, create_model
    runs = [{"name": "ViT", "method": None},
            {"name": "FT EMA", "method": "standard", "model_ema": True, "model_ema_decay": 0.5, "lr": 0.01}]
    ev = dict(TINY["eval"], n_attack=4, corruptions=["contrast"], severities=[5])
    cfg = load_comparison_config(None, **dict(TINY, name="tiny_ema", runs=runs, eval=ev, tables={}))
    out = tmp_path / "res"
    run_comparison(cfg, out, progress=False, log=lambda *a: None)
    vit, ft = (json.loads((out / "evals" / f"{n}.json").read_text()) for n in ("vit", "ft_ema"))
    assert vit["weights"] == "model" and ft["weights"] == "ema" and ft["device"] == "cpu"
    x, y = load_digits(seed=0).test.tensors
    ck = out / "checkpoints" / "ft_ema.pth"
    acc_ema = 100.0 * accuracy(create_model(ck, use_ema=True), x, y)
    acc_raw = 100.0 * accuracy(create_model(ck, use_ema=False), x, y)
    assert acc_ema != acc_raw            # lr 0.01 and decay 0.5: the two weight sets differ measurably
    assert ft["Clean"] == pytest.approx(acc_ema)
    raw_out = tmp_path / "raw"
    run_comparison(load_comparison_config(None, **dict(TINY, name="tiny_ema_raw", runs=runs, eval=dict(ev, use_ema=False),
                                                      tables={})),
                   raw_out, progress=False, log=lambda *a: None)
    raw = json.loads((raw_out / "evals" / "ft_ema.json").read_text())
    assert raw["weights"] == "model" and raw["Clean"] == pytest.approx(acc_raw)
