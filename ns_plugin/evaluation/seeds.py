"""Comparisons over several seeds: one complete comparison per seed, then tables with intervals and tests.

A config with ``seeds: [0, 1, 2]`` runs the single-seed comparison of :mod:`.harness` once per seed into
``OUT/seed_<s>/`` (each resumable on its own; the seed changes the fine-tuning data order, noise inits and
attack starts, not the base model or the test images) and writes into ``OUT/``:

* ``tables.md`` / ``table*.csv``: the paper's Tables 2-4 ("Approximate Nullspace Augmented Finetuning for Robust
  Vision Transformers") with every cell ``mean ± sd [95% t-interval]`` over seeds; then, for each comparison the
  paper makes (:func:`.stats.paper_comparisons`), paired exact tests on the same images — exact McNemar per
  seed and the stratified exact test on the pooled discordant pairs, Holm-adjusted over the family; a
  difference is called significant only when the adjusted p is below 0.05 — and Table 5 (per-round MSE
  probability of the noise on held-out images next to the stopping batch's value);
* ``leaderboard/<board>/<run>.json``: the robustbench entries of seed ``seeds[0]`` with every accuracy replaced
  by the mean over seeds, plus ``n_seeds``, ``<field>_sd`` and ``<field>_ci95`` (``"lo, hi"``);
* ``summary.json`` and ``seeds.json`` (which config owns the folder, and its status).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..errors import NSPluginError
from . import stats as st


def check_seeds(seeds) -> List[int]:
    """``seeds`` must be a non-empty list of distinct non-negative integers."""
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise NSPluginError(f"seeds must be a non-empty list of integers, e.g. [0, 1, 2]; got {seeds!r}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise NSPluginError(f"seeds must hold non-negative integers, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise NSPluginError(f"seeds must be distinct, got {list(seeds)}")
    return list(seeds)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _write(path: Path, text: str) -> None:
    from ..io import atomic_write_text
    atomic_write_text(path, text)


def seed_config(cfg: Mapping[str, Any], seed: int) -> Dict[str, Any]:
    """The single-seed comparison config of ``seed``."""
    sub = {k: copy.deepcopy(v) for k, v in cfg.items() if k != "seeds"}
    sub["seed"] = int(seed)
    sub["name"] = f"{cfg['name']}_s{seed}"     # timm names of the checkpoints stay distinct across seeds
    return sub


def collect(out: Path, cfg: Mapping[str, Any], seeds) -> Dict[str, Any]:
    """Per-seed results found under ``out``: ``evals[run][seed]``, ``rows[run][seed]``, ``logs[run][seed]``."""
    from .harness import _slug
    evals: Dict[str, Dict[int, Any]] = {}
    rows: Dict[str, Dict[int, Any]] = {}
    logs: Dict[str, Dict[int, Any]] = {}
    for s in seeds:
        d = out / f"seed_{s}"
        seed_rows = _read_json(d / "rows.json") or {}
        for run in cfg["runs"]:
            name = run["name"]
            e = _read_json(d / "evals" / f"{_slug(name)}.json")
            if e is not None:
                evals.setdefault(name, {})[s] = e
                if name in seed_rows:
                    rows.setdefault(name, {})[s] = seed_rows[name]
            lg = _read_json(d / "runs" / _slug(name) / "log.json")
            if lg is not None:
                logs.setdefault(name, {})[s] = lg.get("rounds", lg) if isinstance(lg, dict) else lg
    return {"evals": evals, "rows": rows, "logs": logs}


def _summaries(rows: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> Dict[str, Dict[str, Optional[st.Summary]]]:
    out: Dict[str, Dict[str, Optional[st.Summary]]] = {}
    for name, by_seed in rows.items():
        cols = {c for r in by_seed.values() for c in r}
        out[name] = {}
        for c in cols:
            vals = [r[c] for _, r in sorted(by_seed.items()) if isinstance(r.get(c), (int, float))]
            out[name][c] = st.summarize(vals) if vals else None
    return out


def table5_rows(logs: Mapping[str, Mapping[int, List[Mapping[str, Any]]]]) -> List[Dict[str, Any]]:
    """Per run and round: mean over seeds of the stopping batch's MSE probability, the held-out one and the
    noise norm (runs whose log has ``mse_prob``: NS-style and random-noise runs)."""
    out = []
    for name, by_seed in logs.items():
        per_round: Dict[int, List[Mapping[str, Any]]] = {}
        for rows in by_seed.values():
            for r in rows:
                if isinstance(r.get("mse_prob"), (int, float)):
                    per_round.setdefault(int(r["round"]), []).append(r)
        for rnd, rr in sorted(per_round.items()):
            def mean(k):
                v = [float(r[k]) for r in rr if isinstance(r.get(k), (int, float))]
                return sum(v) / len(v) if v else None
            out.append({"run": name, "round": rnd, "seeds": len(rr), "batch_mse_prob": mean("mse_prob"),
                        "heldout_mse_prob": mean("heldout_mse_prob"), "noise_norm": mean("noise_norm"),
                        "eps": mean("eps")})
    return out


def seeded_markdown(cfg: Mapping[str, Any], seeds, summaries, comps: List[st.PairedComparison],
                    table5: List[Dict[str, Any]], *, partial: bool = False) -> Dict[str, Any]:
    """``tables.md`` text and the CSV tables of a seeded comparison."""
    from .harness import TABLE2_COLS, TABLE3_COLS, TABLE4_COLS
    ev = cfg["eval"]
    lines: List[str] = []
    csvs: Dict[str, Any] = {}
    flag = " (PARTIAL: some seeds or runs are missing; rerun the same command to complete)" if partial else ""
    lines.append(f"# {cfg['name']}: robustness comparison over seeds {list(seeds)}{flag}\n")
    lines.append(f"Every cell is mean ± sd [95% t-interval] over the seeds that have the run (n in the run's "
                 f"label when fewer than {len(seeds)}), in %. Attacks run on "
                 f"{'all' if not ev['n_attack'] else 'the first ' + str(ev['n_attack'])} test images (FGSM "
                 f"ε={ev['fgsm_eps'] * 255:.3g}/255, PGD ε={ev['pgd']['eps'] * 255:.3g}/255 x{ev['pgd']['steps']}, "
                 f"CW L2 c={ev['cw']['c']}, PatchFool {ev['patchfool'].get('patches', 1)} patch). C is the mCE against "
                 f"the baseline run of the same seed (= 100, lower is better). Madry / TRADES train with PGD "
                 f"ε={cfg['training'].get('pgd_eps', 8 / 255) * 255:.3g}/255, step "
                 f"{cfg['training'].get('pgd_alpha', 2 / 255) * 255:.3g}/255, {cfg['training'].get('pgd_steps', 10)} "
                 f"steps. Per-seed tables: seed_<s>/tables.md.\n")
    tabs = cfg["tables"]

    def label(name):
        n = max((s.n for s in summaries.get(name, {}).values() if s is not None), default=0)
        return name if n == len(seeds) else f"{name} (n={n})"

    def table(title, names, cols, key, prefix=None):
        head = (["ε", "Fine-tuning", "Run"] if prefix else ["Method"]) + cols
        lines.append(f"## {title}\n")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        rows_csv = []
        for item in names:
            pre, n = (item[:2] if prefix else ([], item))
            if n not in summaries:
                continue
            cells = [st.format_summary(summaries[n].get(c)) for c in cols]
            lines.append("| " + " | ".join(list(pre) + [label(n)] + cells) + " |")
            row = list(pre) + [n]
            for c in cols:
                s = summaries[n].get(c)
                row += ["" if s is None else round(s.mean, 2), "" if s is None or s.sd is None else round(s.sd, 2)]
            rows_csv.append(row)
        lines.append("")
        csv_head = ((["eps", "Fine-tuning", "Run"] if prefix else ["Method"])
                    + [f"{c}{suf}" for c in cols for suf in ("", "_sd")])
        csvs[key] = (csv_head, rows_csv)

    if "table2" in tabs:
        table("Table 2: effect of nullspace fine-tuning", tabs["table2"], TABLE2_COLS + ["Average"], "table2")
    if "table3" in tabs:
        table("Table 3: NS vs Madry vs TRADES", tabs["table3"], TABLE3_COLS, "table3")
    if "table4" in tabs:
        items = []
        for eps, ns_name, rnd_name in tabs["table4"]:
            items += [([eps, "nullspace"], ns_name), ([eps, "random"], rnd_name)]
        table("Table 4: ε and random-noise ablation", items, TABLE4_COLS, "table4", prefix=True)
    lines.append("## Paired tests on the same images\n")
    lines.append("For each comparison the paper makes: exact McNemar per seed (A-only/B-only = images only A / "
                 "only B gets right) and, combined, the stratified exact test on the pooled discordant pairs "
                 "(under H0 each discordant image is a fair coin within its seed; inference is about these test "
                 f"images). Holm-adjusted over all {len(comps)} tests below; the verdict names a winner only when "
                 "the adjusted p < 0.05, otherwise n.s.\n")
    if comps:
        lines.append("| " + " | ".join(st.COMPARISON_HEADER) + " |")
        lines.append("|" + "---|" * len(st.COMPARISON_HEADER))
        for c in comps:
            lines.append("| " + " | ".join(st.format_comparison(c)) + " |")
    else:
        lines.append("(no comparison has per-image results in both runs yet)")
    lines.append("")
    if table5:
        lines.append("## Table 5: per-round MSE probability vs ε, on held-out images\n")
        lines.append("Mean over seeds. `held-out` is the noise's MSE probability on fixed held-out images (never "
                     "searched on); `stopping batch` is the value the search stopped on (below ε by construction, "
                     "so it says nothing about other images).\n")
        lines.append("| Run | Round | ε | held-out | stopping batch | noise norm | seeds |")
        lines.append("|---|---|---|---|---|---|---|")
        f = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        for r in table5:
            lines.append(f"| {r['run']} | {r['round']} | {f(r['eps'])} | {f(r['heldout_mse_prob'])} | "
                         f"{f(r['batch_mse_prob'])} | {'' if r['noise_norm'] is None else round(r['noise_norm'], 2)} | "
                         f"{r['seeds']} |")
        lines.append("")
    return {"text": "\n".join(lines) + "\n", "csvs": csvs}


def _num(v) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def seeded_leaderboard(out: Path, seeds) -> List[Path]:
    """Average the per-seed robustbench entries: accuracies become means over seeds (robustbench's string
    format), with ``n_seeds``, ``<field>_sd`` and ``<field>_ci95`` added."""
    first = out / f"seed_{seeds[0]}" / "leaderboard"
    written = []
    if not first.is_dir():
        return written
    for entry_path in sorted(first.rglob("*.json")):
        rel = entry_path.relative_to(first)
        entries = [_read_json(out / f"seed_{s}" / "leaderboard" / rel) for s in seeds]
        entries = [e for e in entries if e is not None]
        merged = dict(entries[0])
        for k, v in entries[0].items():
            if k in ("eps", "name", "link", "authors", "venue", "architecture", "dataset") or isinstance(v, bool):
                continue
            vals = [_num(e.get(k)) for e in entries]
            if not isinstance(v, str) or any(x is None for x in vals):
                continue
            s = st.summarize(vals)
            merged[k] = f"{s.mean:.2f}"
            if s.sd is not None:
                merged[f"{k}_sd"] = f"{s.sd:.2f}"
                merged[f"{k}_ci95"] = f"{s.lo:.2f}, {s.hi:.2f}"
        merged["n_seeds"] = len(entries)
        merged["seeds"] = [e.get("seed", s) for e, s in zip(entries, seeds)]
        note = (f"mean over {len(entries)} seeds ({', '.join(map(str, seeds[:len(entries)]))}); *_sd = sample sd, "
                f"*_ci95 = 95% Student-t interval of the mean")
        merged["footnote"] = f"{merged.get('footnote', '')}; {note}".lstrip("; ")
        p = out / "leaderboard" / rel
        _write(p, json.dumps(merged, indent=2) + "\n")
        written.append(p)
    if written:
        from .leaderboard import write_leaderboard_page
        written.append(write_leaderboard_page(out / "leaderboard", title=f"ns_plugin comparison over seeds {list(seeds)}"))
    return written


def report(cfg: Mapping[str, Any], out: Path, seeds, *, partial: bool = False) -> Dict[str, Any]:
    """Write ``tables.md``, ``table*.csv``, ``paired_tests.json``, ``summary.json`` and the leaderboard of a
    seeded comparison from what ``out/seed_*`` hold; returns the text and the summary."""
    import csv
    import io
    got = collect(out, cfg, seeds)
    summaries = _summaries(got["rows"])
    pairs = st.paper_comparisons(cfg["tables"])
    comps = st.paired_tests(got["evals"], pairs)
    t5 = table5_rows(got["logs"])
    md = seeded_markdown(cfg, seeds, summaries, comps, t5, partial=partial)
    for key, (head, rows) in md["csvs"].items():
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(head)
        w.writerows(rows)
        _write(out / f"{key}.csv", buf.getvalue())
    _write(out / "tables.md", md["text"])
    _write(out / "paired_tests.json", json.dumps([c.to_dict() for c in comps], indent=1))
    seeded_leaderboard(out, seeds)
    rows = {n: {c: (round(s.mean, 2) if s else None) for c, s in row.items()} for n, row in summaries.items()}
    summary = {"seeds": list(seeds), "rows": rows,
               "intervals": {n: {c: (s.to_dict() if s else None) for c, s in row.items()} for n, row in summaries.items()},
               "significant": [f"{c.a} vs {c.b} {c.metric}" for c in comps if c.significant], "table5": t5}
    _write(out / "summary.json", json.dumps(summary, indent=1, default=float))
    return {"tables": md["text"], **summary}


def run_seeded(cfg: Mapping[str, Any], out: os.PathLike, *, progress: bool = True, log=None) -> Dict[str, Any]:
    """Run (or resume) the comparison once per seed and write the seeded report (see the module docstring).

    Before anything is written, everything the seeds need is checked once (:mod:`.preflight`) and ``out`` is
    claimed (:func:`ns_plugin.io.claim_output`: a second job writing into it fails at once). Under ``torchrun``
    rank 0 owns ``out`` (its files, the report), every rank trains and evaluates each seed with it. A failure
    ends with ``seeds.json`` saying ``failed`` and why, an interruption ``partial``."""
    import contextlib

    from ..errors import one_line
    from ..io import LOCK_NAME, claim_output
    from .harness import Comparison, config_hash, logger, rank_session, validate_config
    log = log if log is not None else logger.info
    seeds = check_seeds(cfg["seeds"])
    cfg = validate_config(copy.deepcopy(dict(cfg)))
    out = Path(out)
    h = config_hash(cfg)
    state = out / "seeds.json"
    t0 = time.time()

    def mark(status, **extra):
        _write(state, json.dumps({"config_hash": h, "seeds": seeds, "status": status,
                                  "updated": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}, indent=2) + "\n")

    def comparison(s: int, **kw) -> Comparison:
        return Comparison(seed_config(cfg, s), out / f"seed_{s}", progress=progress, log=log, **kw)

    with rank_session(cfg["eval"]["wait_timeout"]) as (ranks, _):
        with contextlib.ExitStack() as owned:
            def own() -> None:
                prev = _read_json(state)
                if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
                    if prev is None:
                        raise NSPluginError(f"{out} exists and is not an ns_plugin seeded results folder; choose "
                                            f"another --out")
                    if prev.get("config_hash") != h:
                        raise NSPluginError(f"{out} holds another run (config {prev.get('config_hash')}, this one "
                                            f"{h}); choose another --out or remove it (results are never mixed)")
                if (prev or {}).get("status") != "complete":
                    comparison(seeds[0]).preflight()   # what every seed needs, before anything is written
                owned.enter_context(claim_output(out, what=f"ns-plugin comparison {cfg['name']!r} over seeds"))
                _write(out / "config.json", json.dumps(cfg, indent=2, default=float) + "\n")
                mark("running")
            ranks.main_value(own)
            registered: List[str] = []
            try:
                for s in seeds:
                    if ranks.main:
                        log(f"seed {s} ({seeds.index(s) + 1}/{len(seeds)}) -> {out / f'seed_{s}'}")
                    res = comparison(s, preflight=False).run()
                    registered += res.get("timm_models", [])
            except KeyboardInterrupt:
                if ranks.main:
                    mark("partial", reason="interrupted; rerun the same command to resume")
                    try:
                        report(cfg, out, seeds, partial=True)
                    except Exception:  # noqa: BLE001 - the partial report is best effort; the interrupt matters
                        pass
                raise
            except Exception as e:  # noqa: BLE001 - record why, then let it propagate unchanged
                if ranks.main:
                    mark("failed", error=one_line(e))
                raise

            def finish() -> Dict[str, Any]:
                r = report(cfg, out, seeds)
                mark("complete")
                return r
            res = ranks.main_value(finish)
    return dict(res, config_hash=h, seconds_this_call=round(time.time() - t0, 1), timm_models=registered)
