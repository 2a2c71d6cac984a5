"""Statistics for comparisons over seeds: intervals and paired exact tests on the same images.

Every comparison the paper makes ("Approximate Nullspace Augmented Finetuning for Robust Vision Transformers",
Tables 2-4: NS vs the baseline, NS vs random noise at each ε, DAT + NS vs DAT, NS vs Madry / TRADES) compares two
models on the *same* test images, so the right test is paired:

* **Exact McNemar per seed** (:func:`mcnemar`): of the images exactly one model gets right, ``b`` favour A and
  ``c`` favour B; under H0 (the two models are exchangeable) each such discordant image is a fair coin, so
  ``p = P(|Bin(b + c, 1/2) - (b + c)/2| >= |b - (b + c)/2|)`` (two-sided; equal to
  ``scipy.stats.binomtest(b, b + c, 0.5).pvalue``).
* **Combined across seeds** (:func:`combined_mcnemar`): the stratified (conditional) exact test on the pooled
  discordant pairs. Conditional on each seed's number of discordant images, H0 makes every discordant image an
  independent fair coin *within its seed*, so the total ``sum_s b_s`` is ``Bin(sum_s (b_s + c_s), 1/2)`` and
  the exact binomial test applies to the pooled counts. This is the exact form of the Mantel-Haenszel test for
  matched pairs (all strata share the null odds 1), not a Fisher/Stouffer combination of p-values. Inference is
  conditional on the test images (they are the same in every seed): it says whether the *training procedures*
  differ on these images, with the seeds' training randomness as the replication.
* **Multiplicity**: :func:`holm` adjusts a family of p-values (Holm 1979, controls the family-wise error).
  The harness calls a difference significant only when its Holm-adjusted combined p is below ``alpha``.

Accuracies over seeds are summarised as mean ± sd and a two-sided Student-t interval for the mean
(:func:`summarize`); a paired difference of accuracies gets the t-interval of the per-seed differences.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import NSPluginError

__all__ = ["Summary", "McNemar", "PairedComparison", "summarize", "t_quantile", "binom_two_sided",
           "mcnemar", "combined_mcnemar", "holm", "compare_paired", "format_summary", "format_comparison"]


# ----------------------------------------------------------------------------------------------- summaries
@dataclass
class Summary:
    """Mean, sample sd and the ``level`` t-interval of the mean over ``n`` seeds (``lo``/``hi`` are None for
    ``n < 2``: one seed gives no interval)."""
    n: int
    mean: float
    sd: Optional[float]
    lo: Optional[float]
    hi: Optional[float]
    level: float = 0.95
    values: List[float] = field(default_factory=list)

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def t_quantile(q: float, df: int) -> float:
    """Quantile ``q`` of Student's t with ``df`` degrees of freedom (scipy.stats.t.ppf)."""
    from scipy.stats import t
    return float(t.ppf(q, df))


def summarize(values: Sequence[float], level: float = 0.95) -> Summary:
    """Mean ± sd over seeds and the two-sided ``level`` t-interval for the mean."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        raise NSPluginError("no values to summarise (every seed is missing)")
    if not 0 < level < 1:
        raise NSPluginError(f"level must be in (0, 1), got {level}")
    n = len(vals)
    mean = sum(vals) / n
    if n < 2:
        return Summary(n, mean, None, None, None, level, vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half, level, vals)


# ----------------------------------------------------------------------------------------------- tests
def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair-coin trials (1.0 for ``n = 0``); the same as
    ``scipy.stats.binomtest(k, n, 0.5).pvalue``."""
    if n == 0:
        return 1.0
    if not 0 <= k <= n:
        raise NSPluginError(f"k={k} is not in [0, n={n}]")
    from scipy.stats import binom
    m = min(k, n - k)
    if 2 * m == n:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(m, n, 0.5)))


@dataclass
class McNemar:
    """Exact McNemar test of A vs B on paired correctness: ``a_only`` images only A gets right, ``b_only``
    only B; ``n`` images in all (``None`` for pooled counts); ``p`` two-sided."""
    a_only: int
    b_only: int
    p: float
    n: Optional[int] = None

    @property
    def discordant(self) -> int:
        return self.a_only + self.b_only

    def to_dict(self) -> Dict[str, object]:
        return dict(asdict(self), discordant=self.discordant)


def _as_bools(v, what: str) -> List[bool]:
    try:
        import torch
        if isinstance(v, torch.Tensor):
            v = v.reshape(-1).tolist()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    out = []
    for x in v:
        if x in (0, 1, True, False):
            out.append(bool(x))
        else:
            raise NSPluginError(f"{what} must hold per-image correctness (0/1 or booleans), got {x!r}")
    return out


def mcnemar(a_correct, b_correct) -> McNemar:
    """Exact McNemar test on per-image correctness of two models on the same images (same order)."""
    a, b = _as_bools(a_correct, "a_correct"), _as_bools(b_correct, "b_correct")
    if len(a) != len(b):
        raise NSPluginError(f"paired test needs the same images: got {len(a)} and {len(b)} results")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    return McNemar(a_only, b_only, binom_two_sided(a_only, a_only + b_only), len(a))


def combined_mcnemar(per_seed: Sequence[McNemar]) -> McNemar:
    """Stratified exact McNemar over seeds: the exact binomial test on the pooled discordant counts (valid
    because, given each seed's discordant total, H0 makes every discordant image a fair coin in its seed)."""
    if not per_seed:
        raise NSPluginError("no seeds to combine")
    a = sum(m.a_only for m in per_seed)
    b = sum(m.b_only for m in per_seed)
    return McNemar(a, b, binom_two_sided(a, a + b), None)


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values (same order as given)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adj = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        adj[i] = running
    return adj


# ----------------------------------------------------------------------------------------------- a comparison
@dataclass
class PairedComparison:
    """A vs B on one metric over seeds: per-seed McNemar, the combined test, the mean difference of
    accuracies (A - B, percentage points) with its t-interval, and (after :func:`holm`) ``p_adjusted`` and
    ``significant``."""
    a: str
    b: str
    metric: str
    seeds: List[int]
    per_seed: List[McNemar]
    combined: McNemar
    diff: Summary
    p_adjusted: Optional[float] = None
    significant: Optional[bool] = None
    alpha: float = 0.05

    def to_dict(self) -> Dict[str, object]:
        return {"a": self.a, "b": self.b, "metric": self.metric, "seeds": self.seeds,
                "per_seed": [m.to_dict() for m in self.per_seed], "combined": self.combined.to_dict(),
                "diff": self.diff.to_dict(), "p_adjusted": self.p_adjusted, "significant": self.significant,
                "alpha": self.alpha}


def compare_paired(a: str, b: str, metric: str, a_by_seed: Mapping[int, Sequence], b_by_seed: Mapping[int, Sequence],
                   level: float = 0.95) -> PairedComparison:
    """Compare A and B on the seeds both have. ``*_by_seed`` map a seed to per-image correctness; a model that
    has no seed dependence (the un-fine-tuned baseline) may give one entry under any key, used for every seed."""
    def pick(d, s):
        return d[s] if s in d else (next(iter(d.values())) if len(d) == 1 else None)
    seeds = sorted(set(a_by_seed) | set(b_by_seed))
    seeds = [s for s in seeds if pick(a_by_seed, s) is not None and pick(b_by_seed, s) is not None]
    if not seeds:
        raise NSPluginError(f"{a} and {b} have no seed in common")
    per, diffs = [], []
    for s in seeds:
        ra, rb = _as_bools(pick(a_by_seed, s), a), _as_bools(pick(b_by_seed, s), b)
        per.append(mcnemar(ra, rb))
        diffs.append(100.0 * (sum(ra) - sum(rb)) / max(1, len(ra)))
    return PairedComparison(a, b, metric, seeds, per, combined_mcnemar(per), summarize(diffs, level))


def adjust(comparisons: Sequence[PairedComparison], alpha: float = 0.05) -> List[PairedComparison]:
    """Holm-adjust the combined p-values of a family of comparisons and set ``significant``."""
    adj = holm([c.combined.p for c in comparisons])
    for c, p in zip(comparisons, adj):
        c.p_adjusted, c.alpha = p, alpha
        c.significant = p < alpha
    return list(comparisons)


# ----------------------------------------------------------------------------------------------- formatting
def format_summary(s: Optional[Summary], digits: int = 2) -> str:
    """``mean ± sd [lo, hi]`` (just the mean for one seed)."""
    if s is None:
        return ""
    f = f"{{:.{digits}f}}"
    if s.sd is None:
        return f.format(s.mean)
    return f"{f.format(s.mean)} ± {f.format(s.sd)} [{f.format(s.lo)}, {f.format(s.hi)}]"


def _p(p: Optional[float]) -> str:
    if p is None:
        return ""
    return "<0.0001" if p < 1e-4 else f"{p:.4f}" if p < 0.01 else f"{p:.3f}"


def format_comparison(c: PairedComparison) -> List[str]:
    """One Markdown table row (cells) for a comparison; the verdict says "A > B" / "A < B" only when the
    Holm-adjusted combined test is significant, else "n.s."."""
    if c.significant is None:
        verdict = "not adjusted"
    elif c.significant:
        verdict = f"{c.a} > {c.b}" if c.combined.a_only > c.combined.b_only else f"{c.a} < {c.b}"
    else:
        verdict = "n.s."
    seeds = ", ".join(f"{m.a_only}/{m.b_only} p={_p(m.p)}" for m in c.per_seed)
    return [c.metric, c.a, c.b, format_summary(c.diff), seeds,
            f"{c.combined.a_only}/{c.combined.b_only}", _p(c.combined.p), _p(c.p_adjusted), verdict]


COMPARISON_HEADER = ["Metric", "A", "B", "A − B (pp) mean ± sd [95% CI]", "per seed: A-only/B-only, exact McNemar p",
                     "pooled A-only/B-only", "combined p", "Holm p", "verdict (α = 0.05)"]


# ----------------------------------------------------------------------------------------------- the harness's use
#: Columns whose per-image correctness an evaluation stores (``eval["per_image"][col]``, a "0101..." string).
PAIRED_COLUMNS = ("Clean", "FGSM", "PGD", "CW", "PatchFool", "AutoAttack", "DamageNet", "A", "V2", "R", "Sketch",
                  "Stylized")


def bits(v) -> str:
    """Per-image correctness as a compact ``"0101..."`` string (what result JSON files store)."""
    return "".join("1" if b else "0" for b in _as_bools(v, "correctness"))


def paper_comparisons(tables: Mapping[str, object]) -> List[Tuple[str, str]]:
    """The comparisons the paper makes, read from a comparison config's ``tables``: Table 2 rows in pairs
    (ViT + NS vs ViT, DAT + NS vs DAT), Table 3's last row (NS) vs each other row (Madry, TRADES, ...),
    Table 4's nullspace vs random at each ε. Returned as ``(A, B)`` pairs, without repeats."""
    pairs: List[Tuple[str, str]] = []
    t2 = list(tables.get("table2") or [])
    pairs += [(t2[i], t2[i - 1]) for i in range(1, len(t2), 2)]
    t3 = list(tables.get("table3") or [])
    if len(t3) > 1:
        pairs += [(t3[-1], other) for other in t3[:-1]]
    for row in tables.get("table4") or []:
        pairs.append((row[1], row[2]))
    seen, out = set(), []
    for p in pairs:
        if p not in seen and p[0] != p[1]:
            seen.add(p)
            out.append(p)
    return out


def _pick(by_seed: Mapping[int, object], seed: int):
    """The result of ``seed``, or the only one (a run without seed dependence)."""
    if seed in by_seed:
        return by_seed[seed]
    return next(iter(by_seed.values())) if len(by_seed) == 1 else None


def summarize_runs(evals: Mapping[str, Mapping[int, Mapping[str, object]]], columns: Sequence[str],
                   baseline: Optional[str] = None, level: float = 0.95) -> Dict[str, Dict[str, Optional[Summary]]]:
    """``{run: {column: Summary over seeds}}``; ``C`` is each seed's mCE against the baseline's same seed."""
    from .suite import mce
    out: Dict[str, Dict[str, Optional[Summary]]] = {}
    for name, by_seed in evals.items():
        row: Dict[str, Optional[Summary]] = {}
        for col in columns:
            vals = []
            for s, e in sorted(by_seed.items()):
                if col == "C":
                    base = _pick(evals.get(baseline, {}), s) if baseline else None
                    if base and e.get("corruptions") and base.get("corruptions"):
                        vals.append(mce(e["corruptions"], base["corruptions"]))
                elif e.get(col) is not None:
                    vals.append(float(e[col]))
            row[col] = summarize(vals, level) if vals else None
        out[name] = row
    return out


def paired_tests(evals: Mapping[str, Mapping[int, Mapping[str, object]]], pairs: Sequence[Tuple[str, str]],
                 columns: Sequence[str] = PAIRED_COLUMNS, alpha: float = 0.05) -> List[PairedComparison]:
    """For every ``(A, B)`` pair and column with per-image results in both, the paired exact tests over the
    seeds both have; Holm-adjusted over the whole family."""
    comps = []
    for a, b in pairs:
        if a not in evals or b not in evals:
            continue
        for col in columns:
            def vec(run):
                return {s: [c == "1" for c in e["per_image"][col]] for s, e in evals[run].items()
                        if isinstance(e.get("per_image"), dict) and e["per_image"].get(col)}
            va, vb = vec(a), vec(b)
            if not va or not vb:
                continue
            try:
                comps.append(compare_paired(a, b, col, va, vb))
            except NSPluginError:   # no seed in common
                continue
    return adjust(comps, alpha)
