"""Watermarking (OpenReview:d8VrVfNARSy Eq. 7): the paper's SciPy SLSQP (5000 iterations per patch) against the exact
batched solvers of :mod:`ns_plugin.applications.watermark`, on the SAME patches, for p = 2 and p = 1.

Prints, per p: wall time of both, the time ratio SLSQP / exact, the summed objectives (exact must be <= SLSQP
up to 1e-6 relative on every patch), constraint satisfaction (nullspace residual, box violation; SLSQP's raw
iterate before our exactness fix-up too), then the A.2 quality figures of the exact solver over a set of test
digits (prediction match, mean |Δ p(source class)|, PSNR), and the predictions when SLSQP's raw iterates are
clipped to [0, 1] (a candidate explanation of the paper's 85 %). Ends with ONE JSON line.

Usage: python benchmarks/watermark_speed.py [--patches-p2 32] [--patches-p1 8] [--images 100] [--quick]
(about 1-3 minutes on a loaded 2-core machine; SLSQP p = 1 takes seconds per patch).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patches-p2", type=int, default=32, help="patches solved by both solvers for p=2 (16 per image)")
    ap.add_argument("--patches-p1", type=int, default=8, help="patches solved by both solvers for p=1")
    ap.add_argument("--images", type=int, default=100, help="test digits for the quality report")
    ap.add_argument("--maxiter", type=int, default=5000, help="SLSQP iterations (paper: 5000)")
    ap.add_argument("--quick", action="store_true", help="8/4 patches and 20 images")
    args = ap.parse_args(argv)
    if args.quick:
        args.patches_p2, args.patches_p1, args.images = 8, 4, 20
    warnings.filterwarnings("ignore")

    from ns_plugin.applications.watermark import (evaluate_watermark, solve_patches, text_watermark,
                                                  watermark_images)
    from ns_plugin.data import load_digits
    from ns_plugin.embedded import default_model
    from ns_plugin.nullspace.exact import exact_nullspace

    model, _ = default_model(progress=False)
    ns = exact_nullspace(model)
    xs = load_digits().test.tensors[0]
    wm = text_watermark("NS", ns.image_size, ns.in_chans)
    per_img = (ns.image_size[0] // ns.patch_size[0]) * (ns.image_size[1] // ns.patch_size[1])
    n_img = max(1, -(-max(args.patches_p2, args.patches_p1) // per_img))
    X = ns.to_patches(xs[:n_img].double()).reshape(-1, ns.input_dim)
    Wp = ns.to_patches(wm[None].double().expand(n_img, -1, -1, -1)).reshape(-1, ns.input_dim)

    out = {"benchmark": "watermark_speed", "nullity": ns.nullity, "input_dim": ns.input_dim,
           "slsqp_maxiter": args.maxiter, "threads": torch.get_num_threads()}
    for p, k in ((2, args.patches_p2), (1, args.patches_p1)):
        s = solve_patches(X[:k], Wp[:k], ns.basis, p=p, solver="slsqp", maxiter=args.maxiter)
        e = solve_patches(X[:k], Wp[:k], ns.basis, p=p, solver="exact")
        so, eo = s["objective"], e["objective"]
        worse = int((eo > so + 1e-6 * (1 + so)).sum())
        r = {"n_problems": k, "slsqp_seconds": round(s["seconds"], 3), "exact_seconds": round(e["seconds"], 4),
             "ratio": round(s["seconds"] / e["seconds"], 1),
             "objective_slsqp": float(so.sum()), "objective_exact": float(eo.sum()),
             "objective_slsqp_raw": float(s["raw_objective"].sum()),
             "max_rel_improvement": float(((so - eo) / so.clamp_min(1e-12)).max()),
             "patches_exact_worse": worse,
             "slsqp_not_converged": s["not_converged"], "slsqp_mean_iterations": s["mean_iterations"],
             "slsqp_raw_box_violation": s["raw_box_violation"], "slsqp_shrunk": s["shrunk"],
             "exact_nullspace_residual": e["nullspace_residual"], "exact_box_violation": e["box_violation"],
             "exact_not_converged": e["not_converged"]}
        worse_raw = int((eo > s["raw_objective"] + 1e-6 * (1 + s["raw_objective"])).sum())
        r["patches_exact_worse_than_slsqp_raw"] = worse_raw
        if p == 2:
            r["exact_duality_gap"] = e["duality_gap"]
            r["exact_newton_iterations"] = e["iterations"]
        else:
            h = solve_patches(X[:k], Wp[:k], ns.basis, p=1, solver="highs")
            r.update(exact_ipm_iterations=e["iterations"], exact_relative_gap=e["relative_gap"],
                     highs_seconds=round(h["seconds"], 4), objective_highs=float(h["objective"].sum()),
                     max_abs_diff_exact_vs_highs=float((eo - h["objective"]).abs().max()))
        # whole images solved by SLSQP: predictions of the raw iterate clipped to [0, 1]
        whole = k // per_img
        if whole:
            raw = s["raw_patches"][:whole * per_img].reshape(whole, per_img, -1)
            clipped = ns.from_patches(raw, ns.image_size).clamp(0, 1)
            q = evaluate_watermark(model, xs[:whole], clipped.float(), wm)
            r["slsqp_raw_clipped_pred_match"] = q["pred_match"]
            r["slsqp_raw_clipped_mean_abs_dprob"] = q["mean_abs_dprob"]
        out[f"p{p}"] = r
        print(f"p={p}: {k} patches  SLSQP {s['seconds']:.2f} s (objective {float(so.sum()):.4f}, "
              f"{s['not_converged']} not converged, raw box violation {s['raw_box_violation']:.2e})  "
              f"exact {e['seconds']:.4f} s (objective {float(eo.sum()):.4f}, nullspace residual "
              f"{e['nullspace_residual']:.1e})  ratio {r['ratio']}x, exact worse on {worse} patches", flush=True)

    x = xs[:args.images]
    for p in (2, 1):
        t0 = time.perf_counter()
        res = watermark_images(ns, x, wm, p=p)
        secs = time.perf_counter() - t0
        q = evaluate_watermark(model, x, res.images, wm)
        q.update(seconds=round(secs, 2), embedding_residual=res.info["embedding_residual"],
                 per_patch_ms=round(1000 * secs / (len(x) * per_img), 3))
        out[f"quality_p{p}"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in q.items()}
        print(f"p={p} over {len(x)} test digits ({secs:.1f} s): prediction match {q['pred_match']:.1f}% "
              f"(8-bit file {q['pred_match_uint8']:.1f}%), mean |Δp(source)| {q['mean_abs_dprob']:.2e}% "
              f"(8-bit {q['mean_abs_dprob_uint8']:.3f}%), PSNR vs watermark {q['psnr_vs_watermark']:.2f} dB "
              f"(original {q['psnr_original_vs_watermark']:.2f} dB)", flush=True)
    out["ratio_p2"], out["ratio_p1"] = out["p2"]["ratio"], out["p1"]["ratio"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
