#!/usr/bin/env python
"""Run one of the paper's comparisons from a YAML config (arXiv:2403.10476 Tables 2-4).

    python benchmarks/compare.py benchmarks/configs/compare/ns_vs_baseline.yaml --out results/ns_vs_baseline
    torchrun --nproc_per_node 8 benchmarks/compare.py benchmarks/configs/compare/imagenet_vit_b.yaml
    python benchmarks/compare.py benchmarks/configs/compare/imagenet_vit_s.yaml --smoke        # dress rehearsal

Configs in benchmarks/configs/compare/: ns_vs_baseline, dat_vs_dat_ns,
adversarial (NS vs Madry vs TRADES), ablation (ε and random noise), and imagenet_vit_b / imagenet_vit_s for
GPU users with ImageNet and EasyRobust's benchmark folders; each starts from the demo configuration shipped
with the package (ns_plugin/configs/demo.yaml, used when no config is given). Ends with one JSON line of the measured rows.

``--smoke`` (``--smoke quick`` for the test suite's size) is the dress rehearsal of a paper config: the same
architecture at 224, rows, EMA, AMP flag, evaluators and tables, at toy size, on an ImageNet-layout folder of
variable-size JPEGs it generates (cached); it runs under ``torchrun`` as the real run does. Under ``torchrun``
only rank 0 prints.
"""
import argparse
import json
import os
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
    p.add_argument("--smoke", nargs="?", const="full", choices=["full", "quick"],
                   help="dress rehearsal at toy size on a generated ImageNet-layout folder (default size: full)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="the config's first two runs, 1 round of 2 steps, 16 attacked images, one corruption "
                        "(a smoke run of the whole pipeline)")
    a = p.parse_args(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0   # under torchrun only rank 0 prints
    if main_rank:
        show_library_messages()  # the preflight table, progress notes and warnings, on stderr

    def body() -> int:
        # a smoke run replaces the config's data folders: those of the real run need not exist here
        cfg = load_comparison_config(a.config, check_paths=not a.smoke)
        if a.quick:
            cfg = load_comparison_config(a.config, **quick_overrides(cfg))
        subs = []
        if a.smoke:
            from ns_plugin.evaluation.smoke import smoke_config, smoke_data
            cfg, subs = smoke_config(cfg, smoke_data(a.smoke), a.smoke)
            cfg = load_comparison_config(None, **cfg)
        out = a.out or str(Path("results") / cfg["name"])
        res = run_comparison(cfg, out, progress=not a.quiet and main_rank,
                             log=print if main_rank else (lambda *_: None))
        if main_rank:
            print(res["tables"])
            if subs:
                print("smoke stand-ins: " + "; ".join(subs))
            print(json.dumps({"config": a.config, "smoke": a.smoke, "out": out, "seconds": res["seconds_this_call"],
                              "world_size": res.get("world_size", 1), "rows": res["rows"]}))
        return 0

    return guarded(body, "compare.py",
                   interrupted="interrupted: partial results are marked partial; rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
