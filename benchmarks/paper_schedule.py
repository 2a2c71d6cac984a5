"""One answer to "does NS help here?": the paper's schedule on the embedded default, over seeds, with tests.

    python benchmarks/paper_schedule.py [--out results/paper_schedule] [--seeds 0 1 2] [--batch-size 16]
    python benchmarks/paper_schedule.py --quick --out /tmp/ps     # seconds: the same code on a tiny setting
    python benchmarks/paper_schedule.py --report --out DIR        # rewrite the tables from stored results

"Approximate Nullspace Augmented Finetuning for Robust Vision Transformers", Algorithm 1 / appendix C: K = 20
rounds x S = 40 model steps, ε = 0.03, noise search U(-3, 3) + AdamW 0.1, ≤ 3000 steps, a fresh start every
round; Madry and TRADES trained with PGD ε 8/255, step 2/255, 10 steps (classic Madry CE(adv); TRADES β = 6).
Methods: ViT (the packaged embedded default, not fine-tuned), ViT + FT (plain fine-tuning, same schedule),
ViT + NS, random (the paper's ablation: N(0, 1) token noise shrunk until its MSE probability < ε), Madry,
TRADES, each over every seed (seeds change the fine-tuning data order, noise inits and attack starts; the base
model is the same). Evaluation on the whole test split (360 images): clean, FGSM ε 1/255 (the paper's),
PGD ε 2/255 α 0.5/255 x 10 (8/255 breaks every model on digits), the 15 ImageNet-C corruptions x 5 severities
(mCE against ViT of the same seed), the four synthetic shift sets of the demo, and the DamageNet-style and
ImageNet-A-style sets made with independent surrogate models (:mod:`ns_plugin.evaluation.surrogate_sets`).

Departures from the paper, forced by the CPU budget (2 cores shared by six jobs): batch 8 (paper 128) and
noise-search batch 32 (paper 128); fine-tuning lr 1e-4 (paper 1e-5 for ViT-B; the tiny model was trained from
scratch at 2e-3). ``--batch-size``, ``--search-batch-size`` and ``--lr`` change them.

Every (method, seed) result is written atomically to ``OUT/results/<method>_s<seed>.json`` (per-image
correctness for the paired tests, the per-round training log with ``mse_prob`` and ``heldout_mse_prob``) and
skipped when present; training itself resumes at round boundaries (``OUT/runs/...``). So the same command
continues an interrupted run. ``OUT/tables.md`` holds mean ± sd [95% t-interval] over seeds, the paired exact
tests (McNemar per seed, the stratified exact test on pooled discordant pairs, Holm over the family) and
Table 5 (per-round MSE probability on held-out images vs the stopping batch). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = {"ViT": None, "ViT + FT": "standard", "ViT + NS": "ns", "random": "random", "Madry": "madry",
           "TRADES": "trades"}
#: The comparisons the paper makes (A vs B), each tested on every metric with paired exact tests.
COMPARISONS = [("ViT + NS", "ViT"), ("ViT + NS", "ViT + FT"), ("ViT + NS", "random"), ("ViT + NS", "Madry"),
               ("ViT + NS", "TRADES"), ("ViT + FT", "ViT"), ("random", "ViT")]
PAIRED_METRICS = ["Clean", "FGSM", "PGD", "DamageNet", "A", "V2", "R", "Sketch", "Stylized"]
TABLE_COLS = ["Clean", "FGSM", "PGD", "DamageNet", "A", "C", "V2", "R", "Sketch", "Stylized"]
SET_COLS = {"DamageNet": "damagenet", "A": "natural-adversarial"}   # surrogate_sets.A_STYLE_FOLDER


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def settings(a) -> dict:
    if a.quick:
        return dict(train=dict(rounds=2, steps_per_round=2, batch_size=8, search_batch_size=16, train_limit=64,
                               noise_max_steps=100, pgd_steps=2, heldout_size=32),
                    n_test=40, corruptions=["gaussian_noise", "contrast"], severities=[1, 3])
    return dict(train=dict(rounds=20, steps_per_round=40, batch_size=a.batch_size,
                           search_batch_size=a.search_batch_size, noise_max_steps=3000, pgd_steps=10,
                           heldout_size=180),
                n_test=None, corruptions="all", severities=[1, 2, 3, 4, 5])


def train_config(method: str, seed: int, s: dict, lr: float):
    from ns_plugin.training import load_config
    return load_config(None, method=method, seed=seed, eps=0.03, lim=3.0, noise_lr=0.1, lr=lr, weight_decay=0.05,
                       sched="cosine", pgd_eps=8 / 255, pgd_alpha=2 / 255, madry_clean_weight=0.0, trades_beta=6.0,
                       warm_start=False, probe=False, plot=False, progress=False, **s["train"])


class EvalData:
    """The test split and its corrupted / shifted copies, built once (in memory)."""

    def __init__(self, s: dict, sets_dir=None):
        from ns_plugin.data import load_digits
        from ns_plugin.evaluation import corruptions as C
        d = load_digits(seed=0)
        x, y = d.test.tensors
        if s["n_test"]:
            x, y = x[:s["n_test"]], y[:s["n_test"]]
        self.x, self.y = x, y
        names = list(C.IMAGENET_C) if s["corruptions"] == "all" else s["corruptions"]
        self.corrupted = {(c, k): (C.corrupt(x, c, k, seed=0) * 255).round().to(torch.uint8)
                          for c in names for k in s["severities"]}
        vx, vy = d.val.tensors
        self.shifts = {"V2": (vx, vy), "R": (C.rendition(x, seed=0), y), "Sketch": (C.sketch(x), y),
                       "Stylized": (C.stylize(x, seed=0), y)}
        self.sets = {}
        if sets_dir is not None:       # DamageNet-style / ImageNet-A-style sets made with independent surrogates
            from ns_plugin.evaluation.suite import folder_tensors
            from ns_plugin.evaluation.surrogate_sets import ensure_surrogate_sets
            folders = ensure_surrogate_sets(sets_dir, (d.test.tensors[0], d.test.tensors[1]))
            self.sets = {col: folder_tensors(folders[name]) for col, name in SET_COLS.items()}


def evaluate(model, data: EvalData, seed: int) -> dict:
    import torchattacks
    from ns_plugin.evaluation.suite import attack_correct, correct_mask
    torch.manual_seed(seed)                     # PGD's random start
    model.eval()
    t0 = time.time()
    res = {"correct": {}, "acc": {}}
    res["correct"]["Clean"] = correct_mask(model, data.x, data.y)
    res["correct"]["FGSM"], _ = attack_correct(model, torchattacks.FGSM(model, eps=1 / 255), data.x, data.y)
    pgd = torchattacks.PGD(model, eps=2 / 255, alpha=0.5 / 255, steps=10, random_start=True)
    res["correct"]["PGD"], _ = attack_correct(model, pgd, data.x, data.y)
    for k, (xs, ys) in list(data.shifts.items()) + list(data.sets.items()):
        res["correct"][k] = correct_mask(model, xs, ys)
    res["corruptions"] = {f"{c}/{k}": 100.0 * float(correct_mask(model, xc.float() / 255, data.y).float().mean())
                          for (c, k), xc in data.corrupted.items()}
    res["acc"] = {k: 100.0 * float(v.float().mean()) for k, v in res["correct"].items()}
    res["correct"] = {k: "".join("1" if b else "0" for b in v.tolist()) for k, v in res["correct"].items()}
    res["eval_seconds"] = round(time.time() - t0, 1)
    return res


def run_one(name: str, seed: int, out: Path, s: dict, data: EvalData, lr: float, log) -> dict:
    from ns_plugin.embedded import PACKAGED_SHA256, default_model
    from ns_plugin.io import atomic_write_text
    path = out / "results" / f"{slug(name)}_s{seed}.json"
    if path.is_file():
        rec = json.loads(path.read_text())
        missing = [c for c in data.sets if c not in rec["correct"]]
        if missing:                  # a result from before the sets existed: evaluate the stored model on them
            from ns_plugin.embedded import default_model
            from ns_plugin.evaluation.suite import correct_mask
            from ns_plugin.models import create_model
            work = out / "runs" / f"{slug(name)}_s{seed}" / "model.pth"
            model = default_model(progress=False)[0] if METHODS[name] is None else create_model(work)
            for c in missing:
                v = correct_mask(model.eval(), *data.sets[c])
                rec["correct"][c] = "".join("1" if b else "0" for b in v.tolist())
                rec["acc"][c] = 100.0 * float(v.float().mean())
            atomic_write_text(path, json.dumps(rec, indent=1))
            log(f"{name} seed {seed}: added " + ", ".join(f"{c} {rec['acc'][c]:.2f}" for c in missing))
        return rec
    import copy
    base, _ = default_model(progress=False)
    t0 = time.time()
    method = METHODS[name]
    rec = {"name": name, "method": method, "seed": seed, "base_sha256": PACKAGED_SHA256, "log": []}
    if method is None:
        model = copy.deepcopy(base)
    else:
        cfg = train_config(method, seed, s, lr)
        work = out / "runs" / f"{slug(name)}_s{seed}"
        from ns_plugin.training import train
        summary = train(cfg, work, resume=(work / "last.pth").is_file(), model=copy.deepcopy(base))
        model = summary["model"]
        rec["log"] = [{k: v for k, v in r.items() if isinstance(v, (int, float, bool, str))} for r in summary["log"]]
        rec["train_config"] = cfg.to_dict()
    rec["train_seconds"] = round(time.time() - t0, 1)
    rec.update(evaluate(model, data, seed))
    atomic_write_text(path, json.dumps(rec, indent=1))
    log(f"{name} seed {seed}: train {rec['train_seconds']} s, eval {rec['eval_seconds']} s, "
        + ", ".join(f"{k} {v:.2f}" for k, v in rec["acc"].items()))
    return rec


# ------------------------------------------------------------------------------------------------- report
def report(out: Path, seeds, quick: bool) -> dict:
    from ns_plugin.evaluation import stats as st
    from ns_plugin.evaluation.suite import mce
    from ns_plugin.io import atomic_write_text
    recs = {}
    for p in sorted((out / "results").glob("*.json")):
        r = json.loads(p.read_text())
        recs.setdefault(r["name"], {})[r["seed"]] = r
    if not recs:
        raise SystemExit(f"no results in {out / 'results'}; run without --report first")
    bools = lambda bits: [c == "1" for c in bits]  # noqa: E731

    def corr_dict(r):
        d = {}
        for key, v in r["corruptions"].items():
            c, k = key.split("/")
            d.setdefault(c, {})[int(k)] = v
        return d

    # per-method summaries
    summaries = {}
    for name in METHODS:
        if name not in recs:
            continue
        row = {}
        for col in TABLE_COLS:
            vals = []
            for sd, r in sorted(recs[name].items()):
                if col == "C":
                    base = recs.get("ViT", {}).get(sd)
                    if base is not None and r.get("corruptions"):
                        vals.append(mce(corr_dict(r), corr_dict(base)))
                else:
                    if col in r["acc"]:
                        vals.append(r["acc"][col])
            row[col] = st.summarize(vals) if vals else None
        summaries[name] = row
    comps = []
    for a, b in COMPARISONS:
        if a not in recs or b not in recs:
            continue
        for m in PAIRED_METRICS:
            if not all(m in r["correct"] for rr in (recs[a], recs[b]) for r in rr.values()):
                continue
            comps.append(st.compare_paired(a, b, m, {s: bools(r["correct"][m]) for s, r in recs[a].items()},
                                           {s: bools(r["correct"][m]) for s, r in recs[b].items()}))
    st.adjust(comps, alpha=0.05)

    n_seeds = {n: len(v) for n, v in recs.items()}
    n_img = len(next(iter(next(iter(recs.values())).values()))["correct"]["Clean"])
    lines = [f"# Paper schedule on the embedded default{' (QUICK: a smoke test, not a result)' if quick else ''}\n",
             f"Base model: packaged embedded default, sha256 {next(iter(next(iter(recs.values())).values()))['base_sha256']}. "
             f"Seeds per method: {n_seeds}. Test images: {n_img} (the whole test split unless --quick). "
             f"Cells: mean ± sd [95% t-interval] over seeds, in %; C is mCE against ViT of the same seed "
             f"(lower is better).\n",
             "| Method | " + " | ".join(TABLE_COLS) + " |", "|---|" + "---|" * len(TABLE_COLS)]
    for name, row in summaries.items():
        lines.append(f"| {name} | " + " | ".join(st.format_summary(row[c]) for c in TABLE_COLS) + " |")
    lines += ["", "## Paired tests on the same images",
              "", "Exact McNemar per seed; combined: the stratified exact test on the pooled discordant pairs "
              "(under H0 every discordant image is a fair coin within its seed); Holm over all "
              f"{len(comps)} tests below. A verdict other than n.s. means Holm-adjusted p < 0.05.", "",
              "| " + " | ".join(st.COMPARISON_HEADER) + " |", "|" + "---|" * len(st.COMPARISON_HEADER)]
    for c in comps:
        lines.append("| " + " | ".join(st.format_comparison(c)) + " |")
    # Table 5: per-round MSE probability, stopping batch vs held-out
    lines += ["", "## Table 5: per-round MSE probability (ε = 0.03)", "",
              "mean over seeds of the stopping batch's value (below ε by construction) and of the held-out value "
              "(fixed held-out images: the digits' val split).", "",
              "| Round | NS: stopping batch | NS: held-out | random: stopping batch | random: held-out | NS noise norm |",
              "|---|---|---|---|---|---|"]
    rounds = {}
    for name, key in (("ViT + NS", "ns"), ("random", "random")):
        for r in recs.get(name, {}).values():
            for row in r["log"]:
                if "mse_prob" in row:
                    rounds.setdefault(row["round"], {}).setdefault(key, []).append(row)
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows) if rows and all(k in r for r in rows) else None  # noqa
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    table5 = []
    for rnd in sorted(rounds):
        ns, rd = rounds[rnd].get("ns", []), rounds[rnd].get("random", [])
        vals = [mean(ns, "mse_prob"), mean(ns, "heldout_mse_prob"), mean(rd, "mse_prob"),
                mean(rd, "heldout_mse_prob"), mean(ns, "noise_norm")]
        table5.append({"round": rnd, "ns_batch": vals[0], "ns_heldout": vals[1], "random_batch": vals[2],
                       "random_heldout": vals[3], "ns_norm": vals[4]})
        lines.append(f"| {rnd} | " + " | ".join(fmt(v) for v in vals) + " |")
    lines += ["", "## Cost (seconds, mean over seeds)", "", "| Method | train | eval |", "|---|---|---|"]
    for name, by in recs.items():
        tr = sum(r["train_seconds"] for r in by.values()) / len(by)
        ev = sum(r["eval_seconds"] for r in by.values()) / len(by)
        lines.append(f"| {name} | {tr:.0f} | {ev:.0f} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "tables.md", text)
    result = {"seeds": n_seeds, "n_images": n_img,
              "summary": {n: {c: (s.to_dict() if s else None) for c, s in row.items()} for n, row in summaries.items()},
              "comparisons": [c.to_dict() for c in comps], "table5": table5}
    atomic_write_text(out / "summary.json", json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/paper_schedule")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="NAME")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--search-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny setting that runs in seconds (tests)")
    p.add_argument("--report", action="store_true", help="only rewrite the tables from stored results")
    p.add_argument("--sets", default=None, metavar="DIR",
                   help="DamageNet-style / ImageNet-A-style sets (ns_plugin.evaluation.surrogate_sets): built in DIR "
                        "on first use (trains two surrogate tiny ViTs, ~2 min); default OUT/sets, none with --quick")
    p.add_argument("--no-sets", action="store_true", help="skip the DamageNet-style and ImageNet-A-style columns")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if not a.report:
        s = settings(a)
        out.mkdir(parents=True, exist_ok=True)
        marker = out / "settings.json"
        want = {"quick": a.quick, "batch_size": a.batch_size, "search_batch_size": a.search_batch_size, "lr": a.lr}
        if marker.is_file() and json.loads(marker.read_text()) != want:
            print(f"paper_schedule: error: {out} holds a run with other settings "
                  f"({marker.read_text().strip()}); choose another --out", file=sys.stderr)
            return 2
        from ns_plugin.io import atomic_write_text
        atomic_write_text(marker, json.dumps(want))
        sets = None if a.no_sets or (a.quick and not a.sets) else Path(a.sets or out / "sets")
        data = EvalData(s, sets)
        t0 = time.time()
        for seed in a.seeds:                      # seeds outer: complete seeds first
            for name in a.methods:
                run_one(name, seed, out, s, data, a.lr, log)
        log(f"all runs done in {time.time() - t0:.0f} s")
    res = report(out, a.seeds, a.quick if not a.report else json.loads((out / "settings.json").read_text())["quick"])
    print((out / "tables.md").read_text())
    sig = [f"{c['a']} vs {c['b']} {c['metric']}" for c in res["comparisons"] if c["significant"]]
    print(json.dumps({"out": str(out), "seeds": res["seeds"], "n_images": res["n_images"], "significant": sig}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
