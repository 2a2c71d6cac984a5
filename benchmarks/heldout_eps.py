"""Does "inside the ε-region" hold off the stopping batch? The paper's stop rule vs the confirm rule.

    python benchmarks/heldout_eps.py [--seeds 0 1 2] [--confirm 4] [--batch-size 32] [--quick]

On the packaged embedded default, for each seed: one fresh noise search with the paper's rule (stop when the
MSE probability of the current batch is < ε, "Approximate Nullspace Augmented Finetuning for Robust Vision
Transformers", Alg. 1 line 8) and one with ``confirm`` (the stop must also hold on ``--confirm`` fixed
batches of training images). Reports, per rule: the stopping-batch value, the held-out value (the 180
validation images, never searched on) and the test-split value, the noise norm, steps and seconds. The last
line is one JSON object.
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--confirm", type=int, default=4, help="fixed training batches the confirm rule checks")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eps", type=float, default=0.03)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from ns_plugin.data import load_digits
    from ns_plugin.embedded import default_model
    from ns_plugin.nullspace.metrics import mse_probability
    from ns_plugin.nullspace.search import search_noise

    model, _ = default_model(progress=False)
    d = load_digits(seed=0)
    train_x = d.train.tensors[0]
    held, test = d.val.tensors[0], d.test.tensors[0]
    if a.quick:
        train_x, held, test = train_x[:128], held[:32], test[:32]
    rows = []
    for seed in a.seeds:
        g = torch.Generator().manual_seed(10_000 + seed)
        confirm = train_x[torch.randperm(len(train_x), generator=g)[:a.confirm * a.batch_size]]
        for rule, conf in (("paper", None), (f"confirm x{a.confirm}", confirm)):
            t0 = time.perf_counter()
            v, rec = search_noise(model, train_x, eps=a.eps, batch_size=a.batch_size, generator=seed,
                                  max_steps=100 if a.quick else 3000, confirm=conf)
            secs = time.perf_counter() - t0
            rows.append({"seed": seed, "rule": rule, "batch": rec.mse_prob, "confirm": rec.confirm_mse_prob,
                         "heldout": mse_probability(model, held, v), "test": mse_probability(model, test, v),
                         "norm": rec.norm, "steps": rec.steps, "seconds": round(secs, 2),
                         "confirm_checks": rec.confirm_checks})
    print("| seed | rule | stopping batch | held-out (val) | test | norm | steps | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['rule']} | {r['batch']:.4f} | {r['heldout']:.4f} | {r['test']:.4f} | "
              f"{r['norm']:.1f} | {r['steps']} | {r['seconds']} |")
    summary = {}
    for rule in dict.fromkeys(r["rule"] for r in rows):
        rr = [r for r in rows if r["rule"] == rule]
        summary[rule] = {k: sum(r[k] for r in rr) / len(rr) for k in ("batch", "heldout", "test", "norm", "steps",
                                                                     "seconds")}
    print(json.dumps({"eps": a.eps, "batch_size": a.batch_size, "seeds": a.seeds, "mean": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
