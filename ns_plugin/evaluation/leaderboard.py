"""robustbench leaderboard entries and pages for our comparisons.

robustbench keeps one JSON file per model, ``model_info/<dataset>/<threat>/<Name>.json``, and its leaderboard
code (``robustbench/leaderboard/template.py`` in its repository) reads every JSON of one
``<dataset>/<threat>`` folder, sorts by the first field of ``robustbench.utils.ACC_FIELDS[threat]`` the entry
has (Linf/L2: ``external``, then ``autoattack_acc``; corruptions: ``corruptions_acc``), highest first, and
renders an HTML table. :func:`leaderboard_entries` writes entries that code ranks correctly:

* accuracies, ``eps`` and ``reported`` are strings of percentages, as in robustbench's own entries;
* a Linf entry exists only when AutoAttack ran (``autoattack_acc``; the code that ran is named in the
  footnote); ``external`` is the best known robust accuracy, the minimum over every attack we ran inside the
  same Linf ball (AutoAttack, and PGD/FGSM when their ε is not larger), on the same images as
  ``clean_acc``;
* the dataset key is the data the model was evaluated on (``digits`` for the embedded default), so a digits
  model never lands on an ImageNet board; robustbench's own code refuses a ``digits`` board;
* robustbench's ``corruptions_mce`` is relative to AlexNet; we have no AlexNet, so our entries carry no
  ``corruptions_mce`` but ``corruptions_mce_vs_baseline`` (relative to the comparison's first run = 100),
  named in the footnote.

:func:`render_leaderboard` renders a board with robustbench's sort rule and its table format (the
``leaderboard.html.j2`` of the installed robustbench when it has one; the 1.1.1 wheel does not ship it, so
ours, with the same table id, columns and CSS classes, is used then).
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from ..errors import NSPluginError
from .report import pct

#: robustbench's board fields for the threat models we write (mirrors robustbench.utils.ACC_FIELDS)
ACC_FIELDS = {"Linf": ("external", "autoattack_acc"), "L2": ("external", "autoattack_acc"),
              "corruptions": ("corruptions_acc",)}
#: dataset keys robustbench's leaderboard code accepts
ROBUSTBENCH_DATASETS = ("cifar10", "cifar100", "imagenet")


def eps_string(eps: float) -> str:
    """ε in pixel units as robustbench writes it: ``"4/255"`` when it is a multiple of 1/255."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:g}"


def entry_file_name(name: str) -> str:
    """``<Name>.json`` with characters robustbench's model names do not use replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") + ".json"


def linf_entry(common: Dict[str, Any], *, eps: float, clean_acc: float, autoattack_acc: float,
               other_attacks: Dict[str, Optional[float]], n_images: int, autoattack_source: str,
               autoattack_version: str = "standard", extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A robustbench Linf entry. ``other_attacks`` maps a label (e.g. ``"PGD-10 (2/255)"``) to the robust
    accuracy of an attack inside the same ε ball, on the same images; ``external`` is the minimum of them and
    AutoAttack. ``extra`` adds fields (e.g. seed counts and intervals); it cannot replace robustbench's."""
    known = {f"AutoAttack ({autoattack_version})": autoattack_acc}
    known.update({k: v for k, v in other_attacks.items() if v is not None})
    best_label = min(known, key=lambda k: known[k])
    note = (f"AutoAttack {autoattack_version}, eps {eps_string(eps)}, {autoattack_source}; clean and robust "
            f"accuracy on the same {n_images} test images; best known robust accuracy = minimum over "
            f"{', '.join(known)} ({best_label}).")
    out = dict(common, eps=eps_string(eps), clean_acc=pct(clean_acc), reported=pct(autoattack_acc),
               autoattack_acc=pct(autoattack_acc), external=pct(known[best_label]), footnote=note)
    return _add(out, extra)


def _add(entry: Dict[str, Any], extra: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    clash = sorted(set(extra or {}) & set(entry))
    if clash:
        raise NSPluginError(f"extra leaderboard fields {clash} would replace robustbench's own")
    return {**entry, **(extra or {})}


def corruptions_entry(common: Dict[str, Any], *, clean_acc: float, corruptions_acc: float,
                      mce_vs_baseline: Optional[float], baseline: str, n_corruptions: int,
                      severities: Sequence[int], extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A robustbench corruptions entry (no AlexNet-relative ``corruptions_mce``: see the module doc)."""
    note = (f"corruptions_acc = mean accuracy over {n_corruptions} ImageNet-C corruptions x severities "
            f"{','.join(map(str, severities))}; corruptions_mce_vs_baseline is relative to {baseline!r} (= 100), "
            f"not to AlexNet as robustbench's corruptions_mce.")
    out = dict(common, eps=None, clean_acc=pct(clean_acc), reported=None, corruptions_acc=pct(corruptions_acc),
               footnote=note)
    if mce_vs_baseline is not None:
        out["corruptions_mce_vs_baseline"] = pct(mce_vs_baseline)
    return _add(out, extra)


def write_entries(folder: os.PathLike, dataset: str, threat: str, entries: Iterable[Dict[str, Any]]) -> List[Path]:
    """Write entries to ``folder/<dataset>/<threat>/<Name>.json`` (atomically); returns the paths."""
    from ..io import atomic_write_text
    if threat not in ACC_FIELDS:
        raise NSPluginError(f"unknown threat model {threat!r}; use one of {', '.join(ACC_FIELDS)}")
    paths = []
    for e in entries:
        if e.get("dataset") != dataset:
            raise NSPluginError(f"entry {e.get('name')!r} is for dataset {e.get('dataset')!r}, not {dataset!r}")
        p = Path(folder) / dataset / threat / entry_file_name(e["name"])
        atomic_write_text(p, json.dumps(e, indent=2) + "\n")
        paths.append(p)
    return paths


def sort_key(entry: Dict[str, Any], threat: str) -> float:
    """robustbench's rule: the first of ``ACC_FIELDS[threat]`` present in the entry, as a float."""
    for k in ACC_FIELDS[threat]:
        if k in entry:
            return float(entry[k])
    raise NSPluginError(f"entry {entry.get('name')!r} has none of {ACC_FIELDS[threat]}")


def read_board(folder: os.PathLike, dataset: str, threat: str) -> List[Dict[str, Any]]:
    """The entries of one board, ranked as robustbench ranks them."""
    d = Path(folder) / dataset / threat
    if not d.is_dir():
        raise NSPluginError(f"no leaderboard folder {d} (expected <folder>/<dataset>/<threat>/*.json)")
    models = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]
    models.sort(key=lambda e: sort_key(e, threat), reverse=True)
    return models


def _template():
    """robustbench's installed ``leaderboard.html.j2`` if present, else ours (same table format)."""
    import importlib.util
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    spec = importlib.util.find_spec("robustbench")
    if spec is not None and spec.origin:
        theirs = Path(spec.origin).parent / "leaderboard"
        if (theirs / "leaderboard.html.j2").is_file():
            env = Environment(loader=FileSystemLoader(str(theirs)), autoescape=select_autoescape(["html", "xml"]))
            return env.get_template("leaderboard.html.j2"), "robustbench"
    env = Environment(loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
                      autoescape=select_autoescape(["html", "xml"]))
    return env.get_template("leaderboard.html.j2"), "ns_plugin"


def render_leaderboard(folder: os.PathLike, dataset: str, threat: str) -> str:
    """The HTML ``<table>`` of one board, as robustbench's ``generate_leaderboard`` renders it."""
    template, _ = _template()
    acc = ACC_FIELDS[threat]
    return template.render(threat_model=threat, dataset=dataset, models=read_board(folder, dataset, threat),
                           acc_field=acc[-1])


def write_leaderboard_page(folder: os.PathLike, out: Optional[os.PathLike] = None, title: str = "") -> Path:
    """One HTML page with a robustbench-format table per ``<dataset>/<threat>`` board under ``folder``."""
    from ..io import atomic_write_text
    folder = Path(folder)
    boards = sorted((d.parent.name, d.name) for d in folder.glob("*/*") if d.is_dir() and d.name in ACC_FIELDS
                    and any(d.glob("*.json")))
    if not boards:
        raise NSPluginError(f"no leaderboard entries under {folder} (expected <dataset>/<threat>/*.json)")
    parts = [f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title or 'leaderboard')}"
             f"</title></head><body>\n<h1>{html.escape(title or 'leaderboard')}</h1>\n"]
    for dataset, threat in boards:
        parts.append(f"<h2>{html.escape(dataset)} / {html.escape(threat)}</h2>\n")
        parts.append(render_leaderboard(folder, dataset, threat))
    parts.append("\n</body></html>\n")
    out = Path(out) if out else folder / "index.html"
    atomic_write_text(out, "".join(parts))
    return out
