"""Cost of the ε-approximate noise search (arXiv:2403.10476, Eq. 8 / Algorithm 1 lines 3-14), faithful vs fast.

On the embedded default (cached trained tiny ViT, digits train split) this simulates the rounds of NS
fine-tuning (Alg. 1: a noise search, then S model steps on CE(clean) + CE(clean + noise)) and, on the same
model state each round, times three searches:

* ``faithful``: the reference loop (separate stop-test forwards, full-model clean + noisy passes), fresh
  U(-3, 3) init every round, as in the paper;
* ``fast-fresh``: the fast path from the same fresh init and data order (must give the same noise);
* ``fast-warm``: the fast path warm-started from the previous round's noise with the expansion step (what
  the NS trainer uses); round 0 has no previous noise and is a fresh fast search.

Prints a table and ends with one JSON line: steps, seconds and final noise norms of each, the speed ratios
and whether faithful and fast-fresh noises were identical.

    PYTHONPATH=. python benchmarks/noise_search.py [--rounds 4] [--finetune-steps 10] [--threads 1]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--finetune-steps", type=int, default=10, help="model steps between searches (S)")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eps", type=float, default=0.03)
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--expand", type=float, default=None, help="warm-start growth factor (default: search_noise's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded machine)")
    p.add_argument("--quick", action="store_true", help="2 rounds, 2 fine-tune steps, batch 32, eps 0.3 (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.finetune_steps, args.batch_size, args.eps, args.max_steps = 2, 2, 32, 0.3, 200

    import torch
    import torch.nn.functional as F
    from ns_plugin.anatomy import inject_noise
    from ns_plugin.data import load_digits
    from ns_plugin.embedded import default_model
    from ns_plugin.nullspace.metrics import noise_quality
    from ns_plugin.nullspace.search import search_noise

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, _ = default_model(progress=False)
    splits = load_digits(seed=0)
    x, y = splits.train.tensors
    xt, yt = splits.test.tensors
    opt = torch.optim.AdamW(model.parameters(), lr=args.finetune_lr, weight_decay=0.05)
    g_ft = torch.Generator().manual_seed(args.seed + 1000)
    common = dict(eps=args.eps, max_steps=args.max_steps, batch_size=args.batch_size)

    rows, prev, identical = [], None, []
    print(f"{'round':>5} | {'faithful steps':>14} {'s':>7} {'norm':>6} | {'fast-fresh steps':>16} {'s':>7} "
          f"{'norm':>6} | {'fast-warm steps':>15} {'s':>7} {'norm':>6} {'exp':>3} {'keep%':>6}")
    for k in range(args.rounds):
        seed = args.seed + 17 * k
        v_f, r_f = search_noise(model, x, generator=seed, mode="faithful", **common)
        v_ff, r_ff = search_noise(model, x, generator=seed, mode="fast", **common)
        identical.append(bool(torch.equal(v_f, v_ff)))
        warm_kw = {} if args.expand is None else dict(expand=args.expand)
        v_w, r_w = search_noise(model, x, generator=seed, mode="fast", init=prev, **warm_kw, **common)
        q = noise_quality(model, v_w, xt, yt, generator=seed)
        rows.append(dict(round=k, faithful=r_f.to_dict(), fast_fresh=r_ff.to_dict(), fast_warm=r_w.to_dict(),
                         warm_pred_match=q["pred_match"]))
        print(f"{k:>5} | {r_f.steps:>14} {r_f.seconds:>7.2f} {r_f.norm:>6.2f} | {r_ff.steps:>16} {r_ff.seconds:>7.2f} "
              f"{r_ff.norm:>6.2f} | {r_w.steps:>15} {r_w.seconds:>7.2f} {r_w.norm:>6.2f} {r_w.expansions:>3} "
              f"{q['pred_match']:>6.1f}", flush=True)
        prev = v_w
        # S steps of NS fine-tuning with the warm noise (Alg. 1 lines 15-21), so the next round's model differs
        model.train()
        for _ in range(args.finetune_steps):
            idx = torch.randperm(len(x), generator=g_ft)[:args.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            with inject_noise(model, v_w):
                loss = loss + F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()

    def tot(key, f):
        return sum(r[key][f] for r in rows)

    summary = dict(
        rounds=args.rounds, eps=args.eps,
        expand=args.expand if args.expand is not None else inspect.signature(search_noise).parameters["expand"].default,
        faithful_steps=tot("faithful", "steps"), faithful_seconds=round(tot("faithful", "seconds"), 2),
        fast_fresh_steps=tot("fast_fresh", "steps"), fast_fresh_seconds=round(tot("fast_fresh", "seconds"), 2),
        fast_warm_steps=tot("fast_warm", "steps"), fast_warm_seconds=round(tot("fast_warm", "seconds"), 2),
        faithful_norms=[round(r["faithful"]["norm"], 2) for r in rows],
        fast_warm_norms=[round(r["fast_warm"]["norm"], 2) for r in rows],
        all_reached=all(r[k]["reached"] for r in rows for k in ("faithful", "fast_fresh", "fast_warm")),
        faithful_equals_fast=all(identical),
        warm_pred_match=[round(r["warm_pred_match"], 1) for r in rows],
    )
    summary["speedup_fast_fresh"] = round(summary["faithful_seconds"] / max(summary["fast_fresh_seconds"], 1e-9), 2)
    summary["speedup_fast_warm"] = round(summary["faithful_seconds"] / max(summary["fast_warm_seconds"], 1e-9), 2)
    print(f"total: faithful {summary['faithful_steps']} steps / {summary['faithful_seconds']} s; fast (same noise) "
          f"{summary['fast_fresh_steps']} / {summary['fast_fresh_seconds']} s (x{summary['speedup_fast_fresh']}); "
          f"fast warm {summary['fast_warm_steps']} / {summary['fast_warm_seconds']} s (x{summary['speedup_fast_warm']})")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
