"""Wall time of every training method for the same number of model steps on the embedded default
(digits + the cached trained tiny ViT), and NS with the fast noise search against the faithful one.

    PYTHONPATH=. python benchmarks/train_speed.py [--rounds 3] [--steps-per-round 40] [--batch-size 128]

Targets (issue 4): default NS (fast search) <= 5x a `standard` fine-tune of the same steps, and <= 1/5 of
NS with the faithful search, with every round reaching eps. Prints a table, then ONE JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-per-round", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--search-batch-size", type=int, default=128)
    p.add_argument("--methods", default="standard,ns,ns_faithful,random,madry,trades,dat,dat_ns")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (1: on a shared 2-core machine 2 threads were up to 50x slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="1 round of 2 steps, batch 16, standard and ns only (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps_per_round, args.batch_size, args.search_batch_size = 1, 2, 16, 16
        args.methods = "standard,ns"

    import warnings
    warnings.filterwarnings("ignore")
    import torch

    from ns_plugin.embedded import default_model
    from ns_plugin.training import load_config, train

    torch.set_num_threads(args.threads)
    default_model(progress=False)  # make sure the cache exists before timing
    rows = {}
    for name in args.methods.split(","):
        method, search = ("ns", "faithful") if name == "ns_faithful" else (name, "fast")
        cfg = load_config(method=method, search=search, rounds=args.rounds, steps_per_round=args.steps_per_round,
                          batch_size=args.batch_size, search_batch_size=args.search_batch_size, seed=args.seed,
                          progress=False, plot=False)
        t0 = time.perf_counter()
        s = train(cfg)
        sec = time.perf_counter() - t0
        log = s["log"]
        row = {"seconds": round(sec, 2), "steps": s["steps"],
               "final_loss": round(log[-1]["loss"], 4)}
        if "noise_steps" in log[-1] or "learnt_noise_steps" in log[-1]:
            pre = "" if "noise_steps" in log[-1] else "learnt_"
            row.update(search_seconds=round(sum(r.get("search_seconds", 0.0) for r in log), 2),
                       noise_steps=[r[pre + "noise_steps"] for r in log],
                       noise_norm=[round(r[pre + "noise_norm"], 2) for r in log],
                       mse_prob=[round(r[pre + "mse_prob"], 4) for r in log],
                       all_reached=all(r["reached"] for r in log))
        rows[name] = row
        print(f"{name:12s} {sec:8.2f} s  ({s['steps']} steps)" +
              (f"  search {row['search_seconds']:.2f} s, noise steps {row['noise_steps']}, reached all: "
               f"{row['all_reached']}" if "all_reached" in row else ""), flush=True)

    res = {"benchmark": "train_speed", "rounds": args.rounds, "steps_per_round": args.steps_per_round,
           "batch_size": args.batch_size, "search_batch_size": args.search_batch_size, "threads": args.threads,
           "methods": rows}
    std = rows.get("standard", {}).get("seconds")
    ns = rows.get("ns", {}).get("seconds")
    faithful = rows.get("ns_faithful", {}).get("seconds")
    if std and ns:
        res["ns_over_standard"] = round(ns / std, 2)
        res["target_ns_le_5x_standard"] = ns <= 5 * std
    if ns and faithful:
        res["ns_fast_over_faithful"] = round(ns / faithful, 3)
        res["target_ns_le_fifth_of_faithful"] = ns <= faithful / 5
    if "ns" in rows:
        res["ns_every_round_reached_eps"] = rows["ns"].get("all_reached")
    print(f"\nNS/standard = {res.get('ns_over_standard')}  NS fast/faithful = {res.get('ns_fast_over_faithful')}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
