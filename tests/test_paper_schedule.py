"""benchmarks/paper_schedule.py --quick: the paper-schedule benchmark's code path in seconds."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_paper_schedule_writes_intervals_tests_and_resumes(tmp_path):
    out = tmp_path / "ps"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "paper_schedule.py"), "--quick", "--seeds", "0", "1",
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["seeds"] == {n: 2 for n in ("ViT", "ViT + FT", "ViT + NS", "random", "Madry", "TRADES")}
    text = (out / "tables.md").read_text()
    assert " ± " in text and "## Paired tests on the same images" in text and "## Table 5" in text
    summary = json.loads((out / "summary.json").read_text())
    comps = summary["comparisons"]
    assert {(c["a"], c["b"]) for c in comps} >= {("ViT + NS", "ViT"), ("ViT + NS", "random"), ("ViT + NS", "Madry"),
                                                  ("ViT + NS", "TRADES"), ("ViT + NS", "ViT + FT")}
    for c in comps:
        assert len(c["per_seed"]) == 2 and c["significant"] == (c["p_adjusted"] < 0.05)
    for row in summary["table5"]:           # NS and random noise below eps on their stopping batch,
        assert row["ns_heldout"] is not None   # and the held-out value logged next to it
        assert row["random_batch"] < 0.03
    rec = json.loads((out / "results" / "vit___ns_s1.json").read_text())
    assert all("heldout_mse_prob" in r and r["warm_start"] is False for r in rec["log"])
    # resumable per (method, seed): a second call recomputes nothing
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and (out / "tables.md").read_text() == text
    other = subprocess.run(cmd[:-2] + ["--out", str(out), "--batch-size", "4"], capture_output=True, text=True,
                           timeout=300)
    assert other.returncode == 2 and "other settings" in other.stderr
