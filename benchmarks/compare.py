#!/usr/bin/env python
"""Run one of the paper's comparisons from a YAML config (seed 001 Tables 2-4).

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


def main(argv=None) -> int:
    from ns_plugin.errors import NSPluginError
    from ns_plugin.evaluation.harness import load_comparison_config, run_comparison

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", help="comparison YAML (default: the demo, ns_plugin/configs/demo.yaml)")
    p.add_argument("--out", help="results folder (default: results/<config name>)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        cfg = load_comparison_config(a.config)
        out = a.out or str(Path("results") / cfg["name"])
        res = run_comparison(cfg, out, progress=not a.quiet)
    except NSPluginError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: partial results are marked partial; rerun the same command to resume", file=sys.stderr)
        return 130
    print(res["tables"])
    print(json.dumps({"config": a.config, "out": out, "seconds": res["seconds_this_call"], "rows": res["rows"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
