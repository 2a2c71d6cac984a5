"""ns_plugin.evaluation.stats against known values (scipy.stats.binomtest, t intervals, Holm)."""
import math

import pytest
from scipy.stats import binomtest, t

from ns_plugin.errors import NSPluginError
from ns_plugin.evaluation import stats as st


@pytest.mark.parametrize("k,n", [(0, 4), (4, 4), (3, 10), (7, 10), (5, 10), (12, 40), (60, 200), (1, 1), (0, 0)])
def test_binomial_p_matches_scipy(k, n):
    want = 1.0 if n == 0 else binomtest(k, n, 0.5).pvalue
    assert st.binom_two_sided(k, n) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_mcnemar_counts_discordant_pairs_and_readme_example():
    a = [1, 1, 0, 0, 1, 0, 1, 1]
    b = [1, 0, 1, 1, 1, 1, 0, 1]
    m = st.mcnemar(a, b)
    assert (m.a_only, m.b_only, m.n) == (2, 3, 8)
    assert m.p == pytest.approx(binomtest(2, 5, 0.5).pvalue)
    # the README's old claim: FGSM 103 -> 107 of 120; even if all 4 discordant images favour NS, p = 0.125
    base = [1] * 103 + [0] * 17
    ns = [1] * 103 + [1] * 4 + [0] * 13
    assert st.mcnemar(ns, base).p == pytest.approx(0.125)
    with pytest.raises(NSPluginError, match="same images"):
        st.mcnemar([1, 0], [1])
    with pytest.raises(NSPluginError, match="correctness"):
        st.mcnemar([2], [1])


def test_combined_is_the_exact_test_on_pooled_discordant_counts():
    per = [st.McNemar(4, 0, st.binom_two_sided(4, 4)), st.McNemar(5, 1, st.binom_two_sided(5, 6)),
           st.McNemar(6, 1, st.binom_two_sided(6, 7))]
    assert all(m.p > 0.05 for m in per)        # no seed alone is significant ...
    c = st.combined_mcnemar(per)
    assert (c.a_only, c.b_only) == (15, 2)
    assert c.p == pytest.approx(binomtest(15, 17, 0.5).pvalue) and c.p < 0.01   # ... together they are


def test_summary_t_interval_and_single_seed():
    s = st.summarize([90.0, 92.0, 97.0])
    sd = math.sqrt(((90 - 93) ** 2 + (92 - 93) ** 2 + (97 - 93) ** 2) / 2)
    half = t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert s.mean == pytest.approx(93) and s.sd == pytest.approx(sd)
    assert (s.lo, s.hi) == (pytest.approx(93 - half), pytest.approx(93 + half))
    one = st.summarize([88.0])
    assert one.sd is None and one.lo is None and st.format_summary(one) == "88.00"
    assert st.format_summary(s).startswith("93.00 ± 3.61 [")
    with pytest.raises(NSPluginError):
        st.summarize([])


def test_holm_matches_hand_computation():
    assert st.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert st.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])   # step-down keeps them monotone


def test_compare_paired_verdicts_only_when_significant():
    base = {0: [1] * 80 + [0] * 20}                      # a model without seed dependence: one entry
    better = {s: [1] * 80 + [1] * 15 + [0] * 5 for s in (0, 1, 2)}
    same = {s: ([1] * 79 + [0] + [1] + [0] * 19) for s in (0, 1, 2)}
    c1 = st.compare_paired("NS", "ViT", "FGSM", better, base)
    c2 = st.compare_paired("FT", "ViT", "FGSM", same, base)
    st.adjust([c1, c2])
    assert c1.seeds == [0, 1, 2] and c1.combined.a_only == 45 and c1.significant
    assert c1.diff.mean == pytest.approx(15.0) and c1.diff.sd == 0
    assert not c2.significant and st.format_comparison(c2)[-1] == "n.s."
    assert st.format_comparison(c1)[-1] == "NS > ViT"
    assert len(st.format_comparison(c1)) == len(st.COMPARISON_HEADER)


def test_paper_comparisons_and_seeded_summaries():
    tables = {"table2": ["ViT", "ViT + NS", "DAT", "DAT + NS"], "table3": ["ViT", "Madry", "TRADES", "ViT + NS"],
              "table4": [["0.01", "NS eps=0.01", "random eps=0.01"]]}
    assert st.paper_comparisons(tables) == [("ViT + NS", "ViT"), ("DAT + NS", "DAT"), ("ViT + NS", "Madry"),
                                            ("ViT + NS", "TRADES"), ("NS eps=0.01", "random eps=0.01")]
    cor = lambda a: {"noise": {1: a, 2: a}}  # noqa: E731
    evals = {"ViT": {0: {"Clean": 80.0, "corruptions": cor(50.0), "per_image": {"Clean": "1" * 8 + "00"}}},
             "ViT + NS": {s: {"Clean": 90.0 + s, "corruptions": cor(75.0), "per_image": {"Clean": "1" * 9 + "0"}}
                          for s in (0, 1, 2)}}
    rows = st.summarize_runs(evals, ["Clean", "C"], baseline="ViT")
    assert rows["ViT + NS"]["Clean"].mean == pytest.approx(91) and rows["ViT + NS"]["Clean"].n == 3
    assert rows["ViT + NS"]["C"].mean == pytest.approx(50.0)        # half the baseline's error
    assert rows["ViT"]["Clean"].sd is None
    comps = st.paired_tests(evals, [("ViT + NS", "ViT")])
    assert len(comps) == 1 and comps[0].combined.a_only == 3 and comps[0].combined.b_only == 0
    assert comps[0].p_adjusted == pytest.approx(0.25) and comps[0].significant is False
