"""Leaderboard entries that robustbench's own leaderboard code ranks and renders correctly."""
import json

import pytest

from ns_plugin.errors import NSPluginError
from ns_plugin.evaluation import leaderboard as lb

#: two entries shaped like robustbench's model_info/imagenet/Linf files (strings for accuracies and eps)
REAL = [
    {"link": "https://arxiv.org/abs/2406.05927", "name": "Real strong", "authors": "A. B.", "additional_data": False,
     "number_forward_passes": 1, "dataset": "imagenet", "venue": "arXiv, Jun 2024", "architecture": "ConvNeXt-L",
     "eps": "4/255", "clean_acc": "77.92", "reported": "59.64", "autoattack_acc": "59.64", "external": "58.22",
     "footnote": None, "unreliable": False},
    {"link": "", "name": "Real weak", "authors": "C. D.", "additional_data": False, "number_forward_passes": 1,
     "dataset": "imagenet", "venue": "ICML 2020", "architecture": "ResNet-50", "eps": "4/255", "clean_acc": "62.56",
     "reported": "29.22", "autoattack_acc": "29.22"},
]


def ours(dataset, name, aa, pgd, fgsm=None):
    common = {"link": "", "name": name, "authors": "ns_plugin", "additional_data": False, "number_forward_passes": 1,
              "dataset": dataset, "venue": "ns_plugin 0.1.0", "architecture": "ViT-B/16"}
    return lb.linf_entry(common, eps=4 / 255, clean_acc=70.0, autoattack_acc=aa,
                         other_attacks={"PGD-10 (4/255)": pgd, "FGSM (1/255)": fgsm}, n_images=100,
                         autoattack_source="test")


def test_entry_fields_follow_robustbench_types():
    e = ours("imagenet", "Ours", aa=40.0, pgd=35.5, fgsm=50.0)
    assert e["eps"] == "4/255" and e["clean_acc"] == "70.00" and e["autoattack_acc"] == "40.00"
    assert e["reported"] == "40.00" and isinstance(e["reported"], str)
    assert e["external"] == "35.50"          # best known = the strongest attack we ran (PGD here), not ours by fiat
    assert "PGD-10" in e["footnote"] and "AutoAttack (standard)" in e["footnote"]
    assert ours("imagenet", "O2", aa=30.0, pgd=None)["external"] == "30.00"


def _render_with_robustbench(folder, dataset, threat, monkeypatch):
    """robustbench's generate_leaderboard (the installed module), given a template folder: the 1.1.1 wheel has
    template.py but not leaderboard.html.j2, so it gets ours (same table format)."""
    import jinja2
    from pathlib import Path
    from robustbench.leaderboard import template as rb_template
    ours_dir = Path(lb.__file__).parent / "templates"
    monkeypatch.setattr(rb_template, "PackageLoader", lambda *a, **k: jinja2.FileSystemLoader(str(ours_dir)))
    return rb_template.generate_leaderboard(dataset, threat, str(folder))


def test_robustbench_code_ranks_our_entries_among_real_ones(tmp_path, monkeypatch, capsys):
    lb.write_entries(tmp_path, "imagenet", "Linf", REAL)
    lb.write_entries(tmp_path, "imagenet", "Linf", [ours("imagenet", "Ours A", aa=45.0, pgd=44.0),
                                                    ours("imagenet", "Ours B", aa=12.0, pgd=20.0)])
    want = ["Real strong", "Ours A", "Real weak", "Ours B"]   # by external, else autoattack_acc: 58.22, 44, 29.22, 12
    html_rb = _render_with_robustbench(tmp_path, "imagenet", "Linf", monkeypatch)
    html_ours = lb.render_leaderboard(tmp_path, "imagenet", "Linf")
    for html in (html_rb, html_ours):
        pos = [html.index(f">{n}<") if f">{n}<" in html else html.index(n) for n in want]
        assert pos == sorted(pos), (want, pos)
        assert 'id="imagenet_leaderboard_Linf"' in html and "44.00%" in html
    assert [e["name"] for e in lb.read_board(tmp_path, "imagenet", "Linf")] == want


def test_digits_entries_never_reach_an_imagenet_board(tmp_path, monkeypatch):
    lb.write_entries(tmp_path, "digits", "Linf", [ours("digits", "Tiny", aa=90.0, pgd=95.0)])
    assert not (tmp_path / "imagenet").exists()
    with pytest.raises(ValueError):  # robustbench itself refuses a non-robustbench dataset board
        _render_with_robustbench(tmp_path, "digits", "Linf", monkeypatch)
    with pytest.raises(NSPluginError, match="not 'imagenet'"):
        lb.write_entries(tmp_path, "imagenet", "Linf", [ours("digits", "Tiny", aa=90.0, pgd=95.0)])
    page = lb.write_leaderboard_page(tmp_path, title="digits demo")
    assert 'id="digits_leaderboard_Linf"' in page.read_text() and "Tiny" in page.read_text()


def test_corruption_entry_states_its_mce_reference(tmp_path):
    common = {"name": "Ours C", "dataset": "digits", "link": "", "authors": "", "additional_data": False,
              "number_forward_passes": 1, "venue": "", "architecture": "ViT"}
    e = lb.corruptions_entry(common, clean_acc=95.0, corruptions_acc=61.234, mce_vs_baseline=101.6, baseline="ViT",
                             n_corruptions=15, severities=[1, 2, 3, 4, 5])
    assert "corruptions_mce" not in e and e["corruptions_mce_vs_baseline"] == "101.60"
    assert e["corruptions_acc"] == "61.23" and "not to AlexNet" in e["footnote"]
    lb.write_entries(tmp_path, "digits", "corruptions", [e])
    assert json.loads((tmp_path / "digits" / "corruptions" / "Ours_C.json").read_text()) == e


def test_report_writes_linf_entries_only_where_autoattack_ran():
    from ns_plugin.evaluation.report import leaderboard_entries
    cfg = {"name": "t", "data": "digits", "model": "default", "runs": [{"name": "A"}, {"name": "B"}],
           "eval": {"n_attack": 100, "fgsm_eps": 1 / 255, "pgd": {"eps": 2 / 255, "steps": 10},
                    "autoattack": {"eps": 2 / 255, "version": "standard"}, "leaderboard_dataset": None}}
    evals = {"A": {"AutoAttack": 40.0, "PGD": 38.0, "FGSM": 60.0, "clean_attack_subset": 90.0, "n_attack": 100,
                   "corruptions": {"fog": {"1": 70.0, "5": 50.0}}},
             "B": {"PGD": 30.0, "FGSM": 50.0, "clean_attack_subset": 80.0, "corruptions": {}}}
    rows = {"A": {"Clean": 95.0, "C": 100.0}, "B": {"Clean": 90.0, "C": 110.0}}
    out = leaderboard_entries(cfg, evals, rows, autoattack_source="src")
    assert set(out) == {"digits/Linf/A.json", "digits/corruptions/A.json"}
    a = out["digits/Linf/A.json"]
    assert (a["autoattack_acc"], a["external"], a["clean_acc"], a["eps"]) == ("40.00", "38.00", "90.00", "2/255")
    assert "PGD-10 (2/255)" in a["footnote"] and "src" in a["footnote"]
    assert out["digits/corruptions/A.json"]["corruptions_acc"] == "60.00"
