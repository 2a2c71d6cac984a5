"""Comparisons over seeds: per-seed folders, tables with intervals, paired tests, Table 5, leaderboard."""
import json
import subprocess
import sys

import pytest
import yaml

from ns_plugin.errors import NSPluginError

TWO_SEEDS = {
    "name": "tiny_seeds",
    "seeds": [0, 1],
    "training": {"rounds": 2, "steps_per_round": 1, "batch_size": 16, "search_batch_size": 16,
                 "noise_max_steps": 30, "plot": False, "heldout_size": 32},
    "runs": [{"name": "ViT", "method": None}, {"name": "ViT + NS", "method": "ns"},
             {"name": "random", "method": "random"}],
    "eval": {"n_attack": 24, "cw": {"c": 1.0, "steps": 2, "lr": 0.01}, "patchfool": {"patches": 1, "steps": 2},
             "corruptions": ["contrast"], "severities": [1], "surrogate_sets": False},
    "tables": {"table2": ["ViT", "ViT + NS"], "table4": [["0.03", "ViT + NS", "random"]]},
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
    assert pairs == {("ViT + NS", "ViT"), ("ViT + NS", "random")}
    for t in tests:    # every test used both seeds and the same images
        assert t["seeds"] == [0, 1] and len(t["per_seed"]) == 2
        assert all(m["n"] in (24, 360) for m in t["per_seed"])
        assert t["significant"] == (t["p_adjusted"] < 0.05)
    assert "## Table 5" in text
    summary = json.loads((out / "summary.json").read_text())
    t5 = [row for row in summary["table5"] if row["run"] == "ViT + NS"]
    assert [row["round"] for row in t5] == [1, 2] and all(row["heldout_mse_prob"] is not None for row in t5)
    assert all(row["batch_mse_prob"] < 0.03 for row in t5)
    rnd = [row for row in summary["table5"] if row["run"] == "random"]
    assert rnd and all(row["batch_mse_prob"] < 0.03 for row in rnd)     # the paper's ablation: eps-noise
    board = sorted((out / "leaderboard").rglob("*.json"))
    assert board
    entry = json.loads(board[0].read_text())
    assert entry["n_seeds"] == 2 and "clean_acc_ci95" in entry and "clean_acc_sd" in entry
    # the same command again resumes (nothing recomputed) and another config is refused
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and (out / "tables.md").read_text() == text
    other = dict(TWO_SEEDS, seeds=[0, 2])
    cfg_path.write_text(yaml.safe_dump(other))
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "holds another run" in bad.stderr and bad.stderr.count("\n") <= 2
