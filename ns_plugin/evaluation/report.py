"""Reports of a comparison as pure functions of its results (no training, no files): the paper's tables
("Approximate Nullspace Augmented Finetuning for Robust Vision Transformers", Tables 2-4) as Markdown and CSV
rows, robustbench leaderboard entries (:mod:`.leaderboard`), the training-curve figure (Fig. 4 style), and one training run's log
files and plot (:func:`write_log`, :func:`plot_log`).

``evals`` maps a run name to its evaluation dict (``Clean``, ``FGSM``, ``PGD``, ..., ``corruptions``
``{name: {severity: acc}}``, ``notes``); the harness (:mod:`.harness`) computes them and writes what these
functions return.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

#: Columns of the paper's tables. "PGD" is ours (the paper reports no PGD in Table 2).
TABLE2_COLS = ["Clean", "PatchFool", "CW", "FGSM", "PGD", "DamageNet", "A", "C", "V2", "R", "Sketch", "Stylized"]
TABLE3_COLS = ["Clean", "FGSM", "PGD", "DamageNet", "A", "C", "V2", "R", "Sketch", "Stylized"]
TABLE4_COLS = ["FGSM", "DamageNet", "A", "C", "V2", "R", "Sketch", "Stylized"]

Table = Tuple[List[str], List[List[Any]]]  # CSV header and rows


def slug(name: str) -> str:
    """A file-name form of a run or config name."""
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def pct(v: Optional[float]) -> str:
    """A percentage as robustbench writes it (``"12.34"``; ``""`` for none)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def arch_name(cfg: Dict[str, Any]) -> str:
    """The architecture a comparison config trains (``ns_vit_digits`` for the embedded default)."""
    return "ns_vit_digits" if cfg["model"] == "default" else cfg["model"]


def csv_text(table: Table) -> str:
    header, rows = table
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def table_rows(evals: Dict[str, Dict[str, Any]], baseline: Optional[str]) -> Dict[str, Dict[str, Any]]:
    """One row per run with the Table 2 columns, ``C`` = mCE against ``baseline`` and the paper's ``Average``."""
    from .suite import mce, paper_average
    base = evals.get(baseline) if baseline is not None else None
    rows = {}
    for name, e in evals.items():
        r = {c: e.get(c) for c in TABLE2_COLS}
        r["C"] = mce(e["corruptions"], base["corruptions"]) if base and e.get("corruptions") else None
        rows[name] = r
    avg_cols = [c for c in TABLE2_COLS if c != "PGD"]  # the paper's average has no PGD column
    for r in rows.values():
        r["Average"] = paper_average(r, [c for c in avg_cols if any(rr.get(c) is not None for rr in rows.values())])
    return rows


def tables_markdown(cfg: Dict[str, Any], evals: Dict[str, Dict[str, Any]], rows: Dict[str, Dict[str, Any]], *,
                    baseline: Optional[str], partial: bool = False,
                    timings: Optional[Dict[str, Dict[str, Any]]] = None) -> Tuple[str, Dict[str, Table]]:
    """``tables.md`` text and the CSV tables (``{"table2": (header, rows), ...}``) of a comparison.

    Only numbers that are a function of the config and its seed go here, so two runs of one config write
    identical tables; the wall-clock cost is :func:`cost_markdown` (``cost.md``). ``timings`` is accepted for
    compatibility and unused."""
    ev = cfg["eval"]
    md = io.StringIO()
    csvs: Dict[str, Table] = {}
    flag = " (PARTIAL: the run was interrupted; resume to complete)" if partial else ""
    md.write(f"# {cfg['name']}: robustness comparison{flag}\n\n")
    seed = ev.get("attack_seed")
    which = "the first" if seed is None else f"a fixed index list (seed {seed}) of"
    md.write(f"Attacks run in fp32 on {which} {ev['n_attack'] or 'all'} test images (FGSM ε={ev['fgsm_eps'] * 255:.3g}/255, "
             f"PGD ε={ev['pgd']['eps'] * 255:.3g}/255 x{ev['pgd']['steps']}, CW L2 c={ev['cw']['c']}, "
             f"PatchFool {ev['patchfool'].get('patches', 1)} patch); Clean is the whole test set. ")
    tr = cfg.get("training", {})
    md.write(f"Madry / TRADES train with PGD ε={tr.get('pgd_eps', 8 / 255) * 255:.3g}/255, step "
             f"{tr.get('pgd_alpha', 2 / 255) * 255:.3g}/255, {tr.get('pgd_steps', 10)} steps. ")
    md.write(f"C is the mCE against the baseline run ({baseline!r} = 100), lower is better; the "
             f"Average is the paper's: the mean over the columns with values, C entering as 100 - mCE "
             f"(PGD, our extra column, is left out of it). Empty cells were skipped (see notes).\n\n")
    tabs = cfg["tables"]

    def table(title, names, cols, key):
        md.write(f"## {title}\n\n| Method | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n")
        out_rows = []
        for n in names:
            if n not in rows:
                continue
            vals = [rows[n].get(c) for c in cols]
            md.write(f"| {n} | " + " | ".join("" if v is None else f"{v:.2f}" for v in vals) + " |\n")
            out_rows.append([n] + ["" if v is None else round(v, 2) for v in vals])
        md.write("\n")
        csvs[key] = (["Method"] + cols, out_rows)

    if "table2" in tabs:
        table("Table 2: effect of nullspace fine-tuning", tabs["table2"], TABLE2_COLS + ["Average"], "table2")
    if "table3" in tabs:
        table("Table 3: NS vs Madry vs TRADES", tabs["table3"], TABLE3_COLS, "table3")
    if "table4" in tabs:
        md.write("## Table 4: ε and random-noise ablation\n\n| ε | Fine-tuning | " + " | ".join(TABLE4_COLS)
                 + " |\n|---|---|" + "---|" * len(TABLE4_COLS) + "\n")
        out_rows = []
        for eps, ns_name, rnd_name in tabs["table4"]:
            for label, n in (("nullspace", ns_name), ("random", rnd_name)):
                if n in rows:
                    vals = [rows[n].get(c) for c in TABLE4_COLS]
                    md.write(f"| {eps} | {label} | " + " | ".join("" if v is None else f"{v:.2f}" for v in vals) + " |\n")
                    out_rows.append([eps, label] + ["" if v is None else round(v, 2) for v in vals])
        md.write("\n")
        csvs["table4"] = (["eps", "Fine-tuning"] + TABLE4_COLS, out_rows)
    if evals:
        md.write("Evaluated weights: " + ", ".join(f"{n}: {e.get('weights', 'model')}" for n, e in evals.items())
                 + " (EMA for the rows trained with model_ema). Device: "
                 + ", ".join(sorted({str(e.get("device", "cpu")) for e in evals.values()}))
                 + f"; {max(int(e.get('world_size', 1)) for e in evals.values())} rank(s); "
                 + f"folder engine: {ev.get('engine')}.\n\n")
    notes = sorted({f"{c}: {v}" for e in evals.values() for c, v in e.get("notes", {}).items()})
    if notes:
        md.write("Notes:\n" + "".join(f"- {n}\n" for n in notes) + "\n")
    md.write("Wall-clock cost of each run: cost.md.\n")
    return md.getvalue(), csvs


def cost_markdown(evals: Dict[str, Dict[str, Any]], timings: Optional[Dict[str, Dict[str, Any]]] = None) -> str:
    """``cost.md``: fine-tuning and evaluation seconds and throughput per run (machine-dependent, so kept out
    of the tables)."""
    timings = timings or {}
    md = io.StringIO()
    md.write("## Cost\n\n| Run | fine-tune s | eval s | clean img/s | PGD img/s |\n|---|---|---|---|---|\n")
    for n, e in evals.items():
        md.write(f"| {n} | {timings.get(n, {}).get('finetune_seconds', '')} | {e.get('eval_seconds', '')} | "
                 f"{e.get('clean_images_per_s', '')} | {e.get('PGD_images_per_s', '')} |\n")
    return md.getvalue()


def leaderboard_dataset(cfg: Dict[str, Any]) -> str:
    """The dataset key of a comparison's leaderboard entries: ``eval.leaderboard_dataset`` when the config names
    it (e.g. ``imagenet`` for a real ImageNet folder), else ``digits`` for the embedded default or the data
    folder's name: never a robustbench board by guess."""
    named = cfg["eval"].get("leaderboard_dataset")
    if named:
        return str(named)
    return "digits" if cfg["data"] == "digits" else (Path(str(cfg["data"])).name or "data")


def leaderboard_entries(cfg: Dict[str, Any], evals: Dict[str, Dict[str, Any]], rows: Dict[str, Dict[str, Any]], *,
                        autoattack_source: str = "", baseline: Optional[str] = None,
                        extra: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Dict[str, Any]]:
    """robustbench ``model_info`` entries for each run (:mod:`.leaderboard`), keyed by their path relative to the
    leaderboard folder (``"<dataset>/<threat>/<Name>.json"``). A Linf entry only for runs AutoAttack evaluated;
    a corruptions entry for runs with corruption results. ``extra`` maps a run name to additional fields."""
    from . import leaderboard as lb
    ev = cfg["eval"]
    dataset = leaderboard_dataset(cfg)
    baseline = baseline or cfg["runs"][0]["name"]
    out: Dict[str, Dict[str, Any]] = {}
    for name, e in evals.items():
        r = rows[name]
        common = {"link": "", "name": name, "authors": f"ns_plugin comparison {cfg['name']!r}", "additional_data": False,
                  "number_forward_passes": 1, "dataset": dataset, "venue": "ns_plugin", "architecture": arch_name(cfg)}
        fields = (extra or {}).get(name)
        aa = e.get("AutoAttack")
        if aa is not None and ev.get("autoattack"):
            eps = float(ev["autoattack"]["eps"])
            others = {}
            if e.get("PGD") is not None and ev["pgd"]["eps"] <= eps + 1e-12:
                others[f"PGD-{ev['pgd']['steps']} ({lb.eps_string(ev['pgd']['eps'])})"] = e["PGD"]
            if e.get("FGSM") is not None and ev["fgsm_eps"] <= eps + 1e-12:
                others[f"FGSM ({lb.eps_string(ev['fgsm_eps'])})"] = e["FGSM"]
            out[f"{dataset}/Linf/{lb.entry_file_name(name)}"] = lb.linf_entry(
                common, eps=eps, clean_acc=e.get("clean_attack_subset"), autoattack_acc=aa, other_attacks=others,
                n_images=int(e.get("n_attack") or ev["n_attack"] or 0), autoattack_source=autoattack_source or "AutoAttack",
                autoattack_version=ev["autoattack"].get("version", "standard"), extra=fields)
        corr = e.get("corruptions") or {}
        if corr:
            mean_c = sum(sum(s.values()) / len(s) for s in corr.values()) / len(corr)
            sev = sorted({int(k) for s in corr.values() for k in s})
            out[f"{dataset}/corruptions/{lb.entry_file_name(name)}"] = lb.corruptions_entry(
                common, clean_acc=r["Clean"], corruptions_acc=mean_c, mce_vs_baseline=r.get("C"), baseline=baseline,
                n_corruptions=len(corr), severities=sev, extra=fields)
    return out


def training_curves_figure(logs: Dict[str, Any]):
    """All runs' per-round curves in one matplotlib figure (Fig. 4 style: each metric normalised to its start);
    ``logs`` maps a run name to its ``log.json`` content. None when there is nothing to draw."""
    if not logs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in logs.items():
        rows = rows.get("rounds", rows) if isinstance(rows, dict) else rows
        norms = [r.get("noise_norm") for r in rows if r.get("noise_norm") is not None]
        loss = [r.get("loss") for r in rows if r.get("loss") is not None]
        if norms:
            axes[0].plot([n / norms[0] for n in norms], marker="o", label=name)
        if loss:
            axes[1].plot([v / loss[0] for v in loss], marker=".", label=name)
    axes[0].set(title="noise norm / start (NS-style runs)", xlabel="round")
    axes[1].set(title="training loss / start", xlabel="round")
    for a in axes:
        a.grid(alpha=.3)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------
# one training run's log and its Fig. 4-style plot
# ----------------------------------------------------------------------------------------------------------
def write_log(rows: List[Dict[str, Any]], out: Path) -> None:
    """``out/log.json`` (a list of per-round dicts) and ``out/log.csv`` (one column per key), atomically."""
    from ..io import atomic_write_text
    out = Path(out)
    atomic_write_text(out / "log.json", json.dumps(rows, indent=1))
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(out / "log.csv", buf.getvalue())


#: Series of the Fig. 4-style plot (arXiv:2403.10476 §5.4), when present in the log.
PLOT_KEYS = ("noise_norm", "mse_prob", "noise_steps", "loss", "ce_clean", "ce_noise", "probe_clean_acc",
             "probe_fgsm_acc")


def plot_log(rows: List[Dict[str, Any]], path: os.PathLike, title: str = "") -> Optional[Path]:
    """arXiv:2403.10476 Fig. 4 style: each metric over model steps, divided by its first value. Returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for k in PLOT_KEYS:
        pts = [(r["step"], float(r[k])) for r in rows
               if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
        if len(pts) < 1 or pts[0][1] == 0 or not math.isfinite(pts[0][1]):
            continue
        base = pts[0][1]
        ax.plot([p[0] for p in pts], [p[1] / base for p in pts], marker="o", ms=3, label=k)
        drawn += 1
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("model steps")
    ax.set_ylabel("value / value at start")
    ax.set_title(f"{title} (normalised to start, as in arXiv:2403.10476 Fig. 4)")
    if drawn:
        ax.legend(fontsize=7)
    from ..io import atomic_savefig
    fig.tight_layout()
    try:
        return atomic_savefig(fig, path, dpi=100)
    finally:
        plt.close(fig)
