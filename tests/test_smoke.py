"""The dress rehearsal of a paper-scale comparison, in its quick form: ``benchmarks/compare.py imagenet_vit_s.yaml
--smoke quick`` (ViT-S/16 at 224, the paper config's rows, EMA and evaluators, variable-size JPEGs) in one process
and under ``torchrun --nproc_per_node 2`` (gloo). The full rehearsal (every row) is ``--smoke`` without
``quick``."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "configs" / "compare" / "imagenet_vit_s.yaml"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(out: Path, world: int):
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run.get("reason") is None
    cfg = json.loads((out / "config.json").read_text())
    evals = {p.stem: json.loads(p.read_text()) for p in (out / "evals").glob("*.json")}
    assert sorted(e["name"] for e in evals.values()) == sorted(r["name"] for r in cfg["runs"])
    assert len(evals) >= 2 and cfg["runs"][0]["name"] == "ViT-S"
    for r in cfg["runs"]:
        e = next(e for e in evals.values() if e["name"] == r["name"])
        trained_ema = r.get("method") is not None and r.get("model_ema", cfg["training"].get("model_ema"))
        assert e["weights"] == ("ema" if trained_ema else "model"), r["name"]   # EMA weights exactly when trained so
    for e in evals.values():
        assert e["device"] == "cpu" and e["world_size"] == world and e["n_attack"] == 2
        for col in ("Clean", "FGSM", "PGD", "CW", "PatchFool", "A", "R", "V2", "Sketch", "Stylized"):
            assert 0 <= e[col] <= 100, col
        assert e["PGD"] <= e["clean_attack_subset"] + 1e-9
        assert set(e["corruptions"]) == {"contrast"}
    rows = json.loads((out / "rows.json").read_text())
    assert rows["ViT-S"]["C"] == 100.0                                 # mCE of the baseline against itself
    assert (out / "tables.md").is_file() and (out / "checkpoints").is_dir()
    assert not [p for p in out.rglob(".*") if p.is_file()]              # no temp file left by any rank
    return evals


def test_vit_s_smoke_single_process_and_torchrun(tmp_path):
    env = dict(os.environ, NS_PLUGIN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    one = tmp_path / "one"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(CONFIG), "--smoke", "quick",
                        "--out", str(one), "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["world_size"] == 1
    single = _check(one, 1)
    # the generated folder: ImageNet layout, JPEGs of several sizes
    data = tmp_path / "cache" / "smoke" / "imagenet_quick_v1"
    from PIL import Image
    assert len({Image.open(p).size for p in (data / "imagenet-val").rglob("*.JPEG")}) > 1

    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "benchmarks" / "compare.py"), str(CONFIG),
           "--smoke", "quick", "--out", str(two), "--quiet"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("# imagenet_vit_s_smoke_quick: robustness comparison") == 1   # one rank prints
    assert json.loads(r.stdout.strip().splitlines()[-1])["world_size"] == 2
    double = _check(two, 2)
    # the untrained baseline is the same model in both launches: the same clean accuracies
    assert single["vit_s"]["Clean"] == double["vit_s"]["Clean"]
    assert single["vit_s"]["corruptions"] == double["vit_s"]["corruptions"]
