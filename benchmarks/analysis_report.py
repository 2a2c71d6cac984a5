"""Run the analyses of issue 7 on the embedded default (tiny ViT on digits) and write figures.

* Proposition 1 (arXiv:2403.10476 §3.2, app. B) on every attention layer of the trained model and on a Remark-1
  layer built to satisfy it.
* Jacobian study (arXiv:2401.15568): singular values, Eq. 7 Lipschitz estimates along singular / random / null
  directions (Figs 3-4), embedding matching with cosine per step (Fig. 5), interpolation (Fig. 6).
* Targeted nullspace triplets (OpenReview:d8VrVfNARSy §7, A.3-A.4) with saliency maps (Fig. 5 / Fig. 7 style).

Usage::

    PYTHONPATH=. python benchmarks/analysis_report.py --out results/analysis

Prints ONE JSON line with the measured numbers (and writes it to ``<out>/analysis_report.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return str(path)


def _r(v, n=4):
    return None if v is None else float(f"{v:.{n}g}")


def proposition1_part(model, out: Path):
    from ns_plugin.analysis import proposition1 as p1
    reps = p1.check_model(model, tol=1e-6, n_random=4, n_tokens=17)
    layers = [{
        "layer": r["layer"], "holds": r["holds"],
        "max_asymmetry": _r(max(r["asymmetry"])), "min_asymmetry": _r(min(r["asymmetry"])),
        "max_rowspace_residual": _r(max(r["rowspace_residual"])),
        "min_rowspace_residual": _r(min(r["rowspace_residual"])),
        "colinearity_residual": _r(r["colinearity"]["residual"]), "dim_S": r["dim_S"],
        "admissible_dim": r["admissible_dim"], "admissible_gap": _r(r["admissible_gap"]),
        "rel_head_diff_least_violating": _r(r["verify"]["rel_head_diff"]),
        "rel_head_diff_random": _r(r["verify_random"]["rel_head_diff"]),
    } for r in reps]
    attn = p1.remark1_attention(64, 4, shared=(0, 1), seed=0)
    rc = p1.check_conditions(attn, tol=1e-6)
    g = torch.Generator().manual_seed(0)
    w = p1.construct_w(attn, 17, method="proof", generator=g)
    ver = p1.verify_heads(attn, w, n_random=8, generator=g)
    remark = {"holds": rc["holds"], "max_asymmetry": _r(max(rc["asymmetry"])),
              "max_rowspace_residual": _r(max(rc["rowspace_residual"])),
              "colinearity_residual": _r(rc["colinearity"]["residual"]), "dim_S": rc["dim_S"],
              "w_norm": _r(ver["w_norm"]), "max_head_diff": _r(ver["max_head_diff"]),
              "rel_head_diff": _r(ver["rel_head_diff"]), "max_module_diff": _r(ver["max_module_diff"])}
    return {"trained_layers": layers, "remark1_layer": remark}


def jacobian_part(model, x, y, out: Path, *, n_images: int, match_steps: int, lr: float, seed: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ns_plugin.analysis import jacobian as jm

    f = jm.representation(model, "pre_logits")
    profiles = []
    t0 = time.time()
    for i in range(n_images):
        profiles.append(jm.lipschitz_profile(f, x[i], n_top=16, n_random=32, n_null=32, eps=1e-2, seed=seed + i))
    jac_s = (time.time() - t0) / n_images
    p = profiles[0]
    fig, ax = plt.subplots(2, 1, figsize=(6, 5))
    ax[0].semilogy(p["singular_values"], ".-")
    ax[0].set_title("singular values of df/dx (pre-logits, image 0)")
    ax[1].semilogy(p["singular_values"][:len(p["L_singular"])], "o", label="singular value")
    ax[1].semilogy(p["L_singular"], "x", label="L_LDLC along right singular vector (Eq. 7)")
    ax[1].legend(fontsize=7)
    figs = [_save(fig, out / "fig3_singular_values_lipschitz.png")]
    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    ax[0].hist(sum((q["L_random"] for q in profiles), []), bins=20)
    ax[0].set_title("L_LDLC, random directions")
    ax[1].hist(sum((q["L_null"] for q in profiles), []), bins=20)
    ax[1].set_title("L_LDLC, null-space directions")
    figs.append(_save(fig, out / "fig4_lipschitz_random_vs_null.png"))

    ratio = [lv / sv for q in profiles for lv, sv in zip(q["L_singular"], q["singular_values"])]
    res = {
        "seconds_per_jacobian_profile": _r(jac_s), "rank": [q["rank"] for q in profiles],
        "null_dim": profiles[0]["null_dim"],
        "sigma_max": [_r(q["singular_values"][0]) for q in profiles],
        "sigma_min_nonzero": [_r(q["singular_values"][q["rank"] - 1]) for q in profiles],
        "L_over_sigma_top16_min": _r(min(ratio)), "L_over_sigma_top16_max": _r(max(ratio)),
        "L_random_median": _r(statistics.median(sum((q["L_random"] for q in profiles), []))),
        "L_null_median": _r(statistics.median(sum((q["L_null"] for q in profiles), []))),
        "L_null_max": _r(max(sum((q["L_null"] for q in profiles), []))),
    }

    # embedding matching (Eq. 3-4, Fig. 5) from image 0 to an image of another class
    j = int((y != y[0]).nonzero()[0])
    t0 = time.time()
    m = jm.embedding_matching(f, x[0], x[j], steps=match_steps, lr=lr, classifier=model, record_every=1)
    res["matching"] = {
        "steps": match_steps, "lr": lr, "seconds": _r(time.time() - t0), "source_class": int(y[0]),
        "target_class": int(y[j]), "cosine_start": _r(m["cosine"][0]), "cosine_end": _r(m["cosine"][-1]),
        "loss_start": _r(m["loss"][0]), "loss_end": _r(m["loss"][-1]),
        "pixel_mean_abs_end": _r(m["pixel_mean_abs"][-1]), "pixel_linf_end": _r(m["pixel_linf"][-1]),
        "pred_end": m["pred"][-1],
        "first_step_pred_target": next((s for s, pr in zip(m["step"], m["pred"]) if pr == int(y[j])), None),
    }
    fig, ax = plt.subplots(1, 2, figsize=(9, 3))
    ax[0].plot(m["step"], m["loss"])
    ax[0].set_yscale("log")
    ax[0].set_title("loss (Eq. 3)")
    ax[1].plot(m["step"], m["cosine"], label="cosine to target embedding")
    ax[1].plot(m["step"], m["pixel_mean_abs"], label="mean |x - x0|")
    ax[1].legend(fontsize=7)
    figs.append(_save(fig, out / "fig5_embedding_matching.png"))
    # interpolation (Fig. 6): x0 -> matched image, and the source/target straight line for contrast
    c1 = jm.interpolation_curve(f, x[0], m["x"], n=21)
    c2 = jm.interpolation_curve(f, x[0], x[j], n=21)
    res["interpolation"] = {"x0_to_matched_cos_to_x0_mid": _r(c1["cosine_to_a"][10]),
                            "x0_to_matched_cos_to_end_mid": _r(c1["cosine_to_b"][10]),
                            "x0_to_target_cos_to_x0_mid": _r(c2["cosine_to_a"][10])}
    fig, ax = plt.subplots(1, 2, figsize=(9, 3))
    for a, c, name in ((ax[0], c1, "x0 -> matched"), (ax[1], c2, "x0 -> target image")):
        a.plot(c["t"], c["cosine_to_a"], label="cos to start")
        a.plot(c["t"], c["cosine_to_b"], label="cos to end")
        a.set_title(name)
        a.legend(fontsize=7)
    figs.append(_save(fig, out / "fig6_interpolation.png"))
    fig, ax = plt.subplots(1, 3, figsize=(7, 2.5))
    for a, im, name in zip(ax, (x[0], m["x"][0], x[j]), ("x0", "matched", "target")):
        a.imshow(im.float().clamp(0, 1).permute(1, 2, 0).numpy())
        a.set_title(name)
        a.axis("off")
    figs.append(_save(fig, out / "fig1_matching_images.png"))
    return res, figs


def targeted_part(model, x, y, out: Path, *, n: int):
    from ns_plugin.applications import targeted as T
    src = x[:n]
    idx = []
    for i in range(n):
        idx.append(next(j for j in range(n, len(y)) if int(y[j]) != int(y[i]) and j not in idx))
    tgt = x[idx]
    res, figs = {}, []
    variants = {"project": dict(mode="project"), "project_clip": dict(mode="project", fit="clip"),
                "project_scale": dict(mode="project", fit="scale"),
                "red_exact": dict(mode="channels", channels=(0,)),
                "red_rcond1e-2": dict(mode="channels", channels=(0,), rcond=1e-2),
                "red_exact_clip": dict(mode="channels", channels=(0,), fit="clip")}
    for name, kw in variants.items():
        t0 = time.time()
        rep = T.targeted_triplets(model, src, tgt, transform=T.nullspace_transform(model, **kw),
                                  saliency=name in ("project", "project_clip", "red_exact_clip"))
        s = rep.summary
        row = {k: _r(s[k]) for k in ("match_source", "match_target", "mean_abs_conf_diff", "max_logit_diff",
                                      "l2_to_target", "l2_to_source", "l2_source_target", "closer_to_target",
                                      "out_of_range", "embedding_residual")}
        row["value_range"] = [_r(v) for v in s["value_range"]]
        row["clipped_match_source"] = _r(s["clipped"]["match_source"])
        row["clipped_max_logit_diff"] = _r(s["clipped"]["max_logit_diff"])
        if "saliency" in s:
            row["saliency"] = {m: {ref: {k: _r(v, 3) for k, v in d.items()} for ref, d in refs.items()}
                               for m, refs in s["saliency"].items()}
        row["seconds"] = _r(time.time() - t0)
        res[name] = row
        if name in ("project", "project_clip"):
            figs.append(str(T.plot_triplets(rep, out / f"fig5_triplets_{name}.png", max_triplets=3)))
    return res, figs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/analysis", help="folder for figures and the JSON")
    ap.add_argument("--n-triplets", type=int, default=8)
    ap.add_argument("--n-jacobians", type=int, default=3, help="images for the Jacobian/Lipschitz study")
    ap.add_argument("--match-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.01, help="embedding-matching learning rate (plain GD)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 triplets, 1 Jacobian, 10 matching steps (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_triplets, args.n_jacobians, args.match_steps = 2, 1, 10
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from ns_plugin.data import load_digits
    from ns_plugin.embedded import default_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    model, metrics = default_model()
    model.eval()
    x, y = load_digits(seed=0).test.tensors
    result = {"model_test_acc": _r(metrics.get("test_acc"))}
    t0 = time.time()
    result["proposition1"] = proposition1_part(model, out)
    result["proposition1"]["seconds"] = _r(time.time() - t0)
    jac, f1 = jacobian_part(model, x, y, out, n_images=args.n_jacobians, match_steps=args.match_steps,
                            lr=args.lr, seed=args.seed)
    result["jacobian"] = jac
    tg, f2 = targeted_part(model, x, y, out, n=args.n_triplets)
    result["targeted"] = tg
    result["figures"] = f1 + f2
    result["seconds"] = _r(time.time() - t_all)
    line = json.dumps(result, separators=(",", ":"))
    tmp = out / ".analysis_report.json.tmp"
    tmp.write_text(line + "\n")
    os.replace(tmp, out / "analysis_report.json")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
