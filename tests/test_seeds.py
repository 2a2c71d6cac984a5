"""Comparisons over seeds: per-seed folders, tables with intervals, paired tests, Table 5, leaderboard."""
import json
import subprocess
import sys

import pytest
import yaml

from ns_plugin.errors import NSPluginError

TWO_SEEDS = {
    "name": "tiny_seeds",
    "base": "demo",   # keys not given take the demo's values
    "seeds": [0, 1],
    "training": {"rounds": 2, "steps_per_round": 1, "batch_size": 16, "search_batch_size": 16,
                 "noise_max_steps": 30, "plot": False, "heldout_size": 32},
    "runs": [{"name": "ViT", "method": None}, {"name": "ViT + NS", "method": "ns"}],
    "eval": {"n_attack": 16, "cw": {"c": 1.0, "steps": 1, "lr": 0.01}, "patchfool": {"patches": 1, "steps": 1},
             "corruptions": ["contrast"], "severities": [1], "surrogate_sets": False},
    "tables": {"table2": ["ViT", "ViT + NS"]},
}


def test_seeds_are_checked():
    from ns_plugin.evaluation.harness import load_comparison_config
    for bad in ([], [0, 0], [-1], "0,1", [0.5]):
        with pytest.raises(NSPluginError, match="seeds must"):
            load_comparison_config(None, seeds=bad)


def test_two_seed_comparison_tables_tests_and_leaderboard(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(TWO_SEEDS))
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "ns_plugin", "demo", "--config", str(cfg_path), "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "seed_0" / "tables.md").is_file() and (out / "seed_1" / "tables.md").is_file()
    text = (out / "tables.md").read_text()
    assert "over seeds [0, 1]" in text and " ± " in text and "[" in text
    assert "## Paired tests on the same images" in text and "Holm" in text
    tests = json.loads((out / "paired_tests.json").read_text())
    pairs = {(t["a"], t["b"]) for t in tests}
    assert pairs == {("ViT + NS", "ViT")}
    assert {t["metric"] for t in tests} >= {"Clean", "FGSM", "PGD", "V2"}
    for t in tests:    # every test used both seeds and the same images
        assert t["seeds"] == [0, 1] and len(t["per_seed"]) == 2
        assert all(m["n"] in (16, 180, 360) for m in t["per_seed"])
        assert t["significant"] == (t["p_adjusted"] < 0.05)
    assert "## Table 5" in text
    summary = json.loads((out / "summary.json").read_text())
    t5 = [row for row in summary["table5"] if row["run"] == "ViT + NS"]
    assert [row["round"] for row in t5] == [1, 2] and all(row["heldout_mse_prob"] is not None for row in t5)
    assert all(0 <= row["batch_mse_prob"] <= 2 and row["noise_norm"] > 0 for row in t5)
    board = sorted((out / "leaderboard").rglob("*.json"))
    assert board
    entry = json.loads(board[0].read_text())
    assert entry["n_seeds"] == 2 and "clean_acc_ci95" in entry and "clean_acc_sd" in entry
    # the same config again resumes (every seed complete: only the report is rewritten, identically)
    from ns_plugin.evaluation.harness import load_comparison_config, run_comparison
    cfg = load_comparison_config(cfg_path)
    again = run_comparison(cfg, out, progress=False, log=lambda m: None)
    assert again["tables"] == text and again["seeds"] == [0, 1]
    with pytest.raises(NSPluginError, match="holds another run"):     # another config is refused before work
        run_comparison(dict(cfg, seeds=[0, 2]), out, progress=False, log=lambda m: None)


def test_seeded_comparison_checks_first_and_owns_its_folder(tmp_path):
    """Nothing is written when the preflight fails (a 160-pixel timm ViT on the 32x32 digits), and a folder
    another job holds is refused before anything is written into it."""
    from ns_plugin.evaluation.harness import load_comparison_config, run_comparison
    from ns_plugin.io import claim_output
    quiet = dict(progress=False, log=lambda *a: None)
    bad = load_comparison_config(None, **dict(TWO_SEEDS, model="test_vit",
                                              training=dict(TWO_SEEDS["training"], num_classes=10)))
    with pytest.raises(NSPluginError, match="takes 160x160; use model: default"):
        run_comparison(bad, tmp_path / "bad", **quiet)
    assert not (tmp_path / "bad").exists()
    busy = tmp_path / "busy"
    with claim_output(busy, what="another job"):
        with pytest.raises(NSPluginError, match="in use by PID"):
            run_comparison(load_comparison_config(None, **TWO_SEEDS), busy, **quiet)
        assert sorted(p.name for p in busy.iterdir()) == [".ns_plugin.lock"]


def test_seeded_comparison_under_torchrun_two_ranks(tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo) over two seeds: rank 0 owns the folder and prints one report."""
    import os
    import socket
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(TWO_SEEDS))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), str(root / "benchmarks" / "compare.py"),
                        str(cfg_path), "--out", str(out), "--quiet"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("robustness comparison over seeds [0, 1]") == 1
    assert json.loads((out / "seeds.json").read_text())["status"] == "complete"
    for s in (0, 1):
        run = json.loads((out / f"seed_{s}" / "run.json").read_text())
        assert run["status"] == "complete"
        assert {json.loads(p.read_text())["world_size"] for p in (out / f"seed_{s}" / "evals").glob("*.json")} == {2}
    assert not [p for p in out.rglob(".*") if p.is_file() and p.name != ".ns_plugin.lock"]


def test_seeded_tables_rows_have_as_many_cells_as_their_header():
    """Table 4 of the report over seeds names the run of each row: its header says so (a misaligned markdown
    table would shift every number one column to the right)."""
    from ns_plugin.evaluation import stats as st
    from ns_plugin.evaluation.harness import TABLE2_COLS, load_comparison_config
    from ns_plugin.evaluation.seeds import seeded_markdown
    cfg = load_comparison_config(None)          # the demo config: Tables 2, 3 and 4
    names = {r["name"] for r in cfg["runs"]}
    summaries = {n: {c: st.summarize([50.0, 52.0, 54.0]) for c in TABLE2_COLS + ["Average"]} for n in names}
    md = seeded_markdown(cfg, [0, 1, 2], summaries, [], [])
    tables = [b for b in md["text"].split("\n\n") if b.lstrip().startswith("|")]
    assert len(tables) >= 3
    for block in tables:
        rows = [r for r in block.strip().splitlines() if r.startswith("|")]
        widths = {r.count("|") for r in rows}
        assert len(widths) == 1, block
    t4 = next(b for b in tables if "Fine-tuning" in b)
    assert "| ε | Fine-tuning | Run | FGSM |" in t4
    head, rows = md["csvs"]["table4"]
    assert all(len(r) == len(head) for r in rows)
