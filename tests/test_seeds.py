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
