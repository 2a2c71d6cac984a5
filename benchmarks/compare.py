#!/usr/bin/env python
"""Run one of the paper's comparisons from a YAML config (arXiv:2403.10476 Tables 2-4).

    python benchmarks/compare.py benchmarks/configs/compare/ns_vs_baseline.yaml --out results/ns_vs_baseline

Configs in benchmarks/configs/compare/: ns_vs_baseline, dat_vs_dat_ns,
adversarial (NS vs Madry vs TRADES), ablation (ε and random noise), and imagenet_vit_b / imagenet_vit_s for
GPU users with ImageNet and EasyRobust's benchmark folders; each starts from the demo configuration shipped
with the package (ns_plugin/configs/demo.yaml, used when no config is given). Ends with one JSON line of the measured rows.
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def quick_overrides(cfg):
    """A few-minute version of ``cfg``: its first two runs, tiny training and evaluation."""
    runs = cfg["runs"][:2]
    names = {r["name"] for r in runs}
    return {"name": f"{cfg['name']}_quick", "runs": runs,
            "training": {"rounds": 1, "steps_per_round": 2, "batch_size": 16, "search_batch_size": 16,
                         "noise_max_steps": 30, "pgd_steps": 1, "plot": False},
            "eval": {"n_attack": 16, "pgd": {"eps": 2 / 255, "alpha": 1 / 255, "steps": 2},
                     "cw": {"c": 1.0, "steps": 2, "lr": 0.01}, "patchfool": {"patches": 1, "steps": 2},
                     "severities": [1], "corruptions": ["gaussian_noise"]},
            "tables": {"table2": [n for n in cfg["tables"].get("table2", []) if n in names] or [runs[0]["name"]]}}


def main(argv=None) -> int:
    from ns_plugin.cli import guarded, show_library_messages
    from ns_plugin.evaluation.harness import load_comparison_config, run_comparison

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", help="comparison YAML (default: the demo, ns_plugin/configs/demo.yaml)")
    p.add_argument("--out", help="results folder (default: results/<config name>)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="the config's first two runs, 1 round of 2 steps, 16 attacked images, one corruption "
                        "(a smoke run of the whole pipeline)")
    a = p.parse_args(argv)
    show_library_messages()  # the preflight table, progress notes and warnings, on stderr

    def body() -> int:
        cfg = load_comparison_config(a.config)
        if a.quick:
            cfg = load_comparison_config(a.config, **quick_overrides(cfg))
        out = a.out or str(Path("results") / cfg["name"])
        res = run_comparison(cfg, out, progress=not a.quiet)
        print(res["tables"])
        print(json.dumps({"config": a.config, "out": out, "seconds": res["seconds_this_call"], "rows": res["rows"]}))
        return 0

    return guarded(body, "compare.py",
                   interrupted="interrupted: partial results are marked partial; rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
