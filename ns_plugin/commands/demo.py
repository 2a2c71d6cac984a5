"""``ns-plugin demo``: the whole comparison on the embedded default (arXiv:2403.10476 Tables 2-4, Fig. 4)."""
from __future__ import annotations

import json

HELP = ("run the paper's comparison on the embedded default (digits + tiny ViT): fine-tune with every method, "
        "evaluate clean/FGSM/PGD/CW/PatchFool/corruptions/shifts, write tables, leaderboard JSON, plots, "
        "checkpoints to results/demo/")


def add_arguments(p):
    from ..validation import PathCheck, argtype
    p.add_argument("--out", default="results/demo", type=argtype(PathCheck("out_dir"), "--out"),
                   help="results folder (default: results/demo). A folder holding this same run is resumed; one "
                        "holding another run is refused")
    p.add_argument("--config", metavar="YAML",
                   type=argtype(PathCheck("file"), "--config"), help="comparison config (default: the built-in demo config)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..evaluation.harness import load_comparison_config, run_comparison
    cfg = load_comparison_config(args.config)
    if cfg.get("model") == "default":
        from ..embedded import PACKAGED_SHA256, packaged_weights_path
        print(f"base model: the packaged embedded default {packaged_weights_path().name} "
              f"sha256 {PACKAGED_SHA256} (verified on load)")
    try:
        res = run_comparison(cfg, args.out, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted: partial results in {args.out} (tables marked PARTIAL); run the same command to resume")
        return 130
    print(res["tables"])
    print(f"results: {args.out} (tables.md, table*.csv, cost.md, leaderboard/, training_curves.png, checkpoints/)")
    print(json.dumps({"out": str(args.out), "seconds": res["seconds_this_call"],
                      "rows": res["rows"], "timm_models": len(res["timm_models"])}))
    return 0
