"""The comparison harness behind ``ns-plugin demo`` and ``benchmarks/compare.py`` (seed 001 Tables 2-4, Fig. 4).

One config (YAML or dict) names the data, the starting model, the shared training settings, the list of
fine-tuning runs and the evaluation. The harness then

1. writes the test set, its ImageNet-C corruptions (15 x 5 severities) and shift sets as EasyRobust folders,
2. fine-tunes each run with :func:`ns_plugin.training.train` (one shared loop, methods by name),
3. evaluates each model: clean, torchattacks FGSM/PGD/CW, PatchFool, optional AutoAttack and DamageNet,
   corruptions (mCE against the first run, the baseline) and shifts,
4. writes ``tables.md`` / ``table*.csv`` shaped like the paper's Tables 2-4, robustbench-style leaderboard
   JSON entries, training-curve plots, safe checkpoints registered as timm models, and ``summary.json``.

Every step's output is written atomically and skipped when present, so an interrupted run (Ctrl-C, a kill)
resumes where it stopped; ``run.json`` says ``running``/``partial``/``complete``. A results folder holding a
run of another config is refused, never mixed.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


from ..errors import NSPluginError
from .corruptions import IMAGENET_C

#: The demo on the embedded default: every method of the paper on digits + tiny ViT, about 5 min on 2 cores.
DEMO_CONFIG: Dict[str, Any] = {
    "name": "demo",
    "data": "digits",
    "model": "default",
    "seed": 0,
    "seeds": [0, 1, 2],
    "training": {"rounds": 5, "steps_per_round": 12, "batch_size": 64, "lr": 1e-4, "search_batch_size": 64,
                 "noise_max_steps": 300, "pgd_steps": 3, "pgd_alpha": 3 / 255, "plot": True},
    "runs": [
        {"name": "ViT", "method": None},
        {"name": "ViT + NS", "method": "ns"},
        {"name": "ViT + FT", "method": "standard"},
        {"name": "Madry", "method": "madry"},
        {"name": "TRADES", "method": "trades"},
        {"name": "DAT", "method": "dat"},
        {"name": "DAT + NS", "method": "dat_ns"},
        {"name": "NS eps=0.01", "method": "ns", "eps": 0.01},
        {"name": "random eps=0.01", "method": "random", "eps": 0.01},
        {"name": "random eps=0.03", "method": "random", "eps": 0.03},
        {"name": "NS eps=0.1", "method": "ns", "eps": 0.1},
        {"name": "random eps=0.1", "method": "random", "eps": 0.1},
    ],
    "eval": {"n_attack": None, "fgsm_eps": 1 / 255, "pgd": {"eps": 2 / 255, "alpha": 0.5 / 255, "steps": 10},
             "cw": {"c": 1.0, "steps": 30, "lr": 0.01}, "patchfool": {"patches": 1, "steps": 30},
             "autoattack": None, "damagenet": None, "engine": "fast", "severities": [1, 2, 3, 4, 5],
             "corruptions": "all", "surrogate_sets": True},
    "tables": {
        "table2": ["ViT", "ViT + NS", "DAT", "DAT + NS"],
        "table3": ["ViT", "Madry", "TRADES", "ViT + NS"],
        "table4": [["0.01", "NS eps=0.01", "random eps=0.01"], ["0.03", "ViT + NS", "random eps=0.03"],
                   ["0.1", "NS eps=0.1", "random eps=0.1"]],
    },
}

_TOP_KEYS = {"name", "data", "model", "seed", "seeds", "training", "runs", "eval", "tables"}
_EVAL_KEYS = set(DEMO_CONFIG["eval"])
_TABLE_KEYS = {"table2", "table3", "table4"}

#: Columns of the paper's tables (seed 001). "PGD" is ours (the paper reports no PGD in Table 2).
TABLE2_COLS = ["Clean", "PatchFool", "CW", "FGSM", "PGD", "DamageNet", "A", "C", "V2", "R", "Sketch", "Stylized"]
TABLE3_COLS = ["Clean", "FGSM", "PGD", "DamageNet", "A", "C", "V2", "R", "Sketch", "Stylized"]
TABLE4_COLS = ["FGSM", "DamageNet", "A", "C", "V2", "R", "Sketch", "Stylized"]


# ----------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------
def load_comparison_config(path: Optional[os.PathLike] = None, **overrides) -> Dict[str, Any]:
    """The demo config, or a YAML file's (keys it omits take the demo's values), validated."""
    cfg = copy.deepcopy(DEMO_CONFIG)
    if path is not None:
        from ..io import read_yaml_mapping
        _merge(cfg, read_yaml_mapping(path))
    _merge(cfg, overrides)
    return validate_config(cfg)


def _merge(base: Dict[str, Any], new: Dict[str, Any]) -> None:
    for k, v in new.items():
        if k in ("training", "eval", "tables") and isinstance(v, dict) and isinstance(base.get(k), dict):
            if k == "tables":
                base[k] = dict(v)
            else:
                base[k].update(v)
        else:
            base[k] = v


def validate_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Refuse unknown keys and methods with one clear line each."""
    import difflib
    from ..registry import trainers
    from ..training import config as tc
    from ..training import methods as _m  # noqa: F401  (registers the methods)

    def unknown(keys, known, where):
        for k in keys:
            if k not in known:
                close = difflib.get_close_matches(k, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise NSPluginError(f"unknown key {k!r} in {where}{hint} (known: {', '.join(sorted(known))})")

    unknown(cfg, _TOP_KEYS, "the comparison config")
    if "seeds" in cfg:
        from .seeds import check_seeds
        check_seeds(cfg["seeds"])
    unknown(cfg["eval"], _EVAL_KEYS, "eval")
    unknown(cfg["tables"], _TABLE_KEYS, "tables")
    train_keys = {f.name for f in __import__("dataclasses").fields(tc.TrainConfig)} - {"method", "model", "data"}
    unknown(cfg["training"], train_keys, "training")
    runs = cfg["runs"]
    if not isinstance(runs, list) or not runs:
        raise NSPluginError("runs must be a non-empty list; the first run is the baseline")
    names = set()
    for r in runs:
        if not isinstance(r, dict) or "name" not in r:
            raise NSPluginError(f"each run needs a name, got {r!r}")
        unknown([k for k in r if k not in ("name", "method")], train_keys, f"run {r['name']!r}")
        if r["name"] in names:
            raise NSPluginError(f"run name {r['name']!r} appears twice")
        names.add(r["name"])
        if r.get("method") is not None:
            trainers.get(r["method"])
    for t, rows in cfg["tables"].items():
        flat = [n for row in rows for n in (row[1:] if isinstance(row, list) else [row])]
        for n in flat:
            if n not in names:
                raise NSPluginError(f"{t} names run {n!r}, which is not in runs")
    return cfg


def config_hash(cfg: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# small atomic helpers
# ----------------------------------------------------------------------------------------------------------
def _write_text(path: Path, text: str) -> None:
    from ..io import atomic_write_text
    atomic_write_text(path, text)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------
class Comparison:
    """One comparison run in a results folder (see the module docstring)."""

    def __init__(self, cfg: Dict[str, Any], out: os.PathLike, *, progress: bool = True, log=print):
        self.cfg = validate_config(copy.deepcopy(cfg))
        self.out = Path(out)
        self.progress = progress
        self.log = log
        self.hash = config_hash(self.cfg)
        self.baseline_name = self.cfg["runs"][0]["name"]

    # -- results folder ownership ---------------------------------------------------------------------------
    def claim(self) -> str:
        """Take the results folder: new, or a run of the same config (resumed). Another run is refused."""
        state = self.out / "run.json"
        if self.out.exists() and any(self.out.iterdir()):
            if not state.is_file():
                raise NSPluginError(f"{self.out} exists and is not an ns_plugin results folder; choose another --out")
            prev = json.loads(state.read_text())
            if prev.get("config_hash") != self.hash:
                raise NSPluginError(f"{self.out} holds another run (config {prev.get('config_hash')}, this one "
                                    f"{self.hash}); choose another --out or remove it (results are never mixed)")
            status = prev.get("status", "partial")
        else:
            status = "new"
        _write_json(self.out / "config.json", self.cfg)
        self._state("running")
        return status

    def _state(self, status: str, **extra) -> None:
        path = self.out / "run.json"
        prev = json.loads(path.read_text()) if path.is_file() else {}
        prev.update({"config_hash": self.hash, "status": status, "updated": time.strftime("%Y-%m-%d %H:%M:%S")},
                    **extra)
        _write_json(path, prev)

    # -- data -----------------------------------------------------------------------------------------------
    def data(self):
        from ..data import image_folder, load_digits, tensors
        from .corruptions import write_benchmark_folders
        cfg = self.cfg
        sev = list(cfg["eval"]["severities"])
        if cfg["data"] == "digits":
            s = load_digits(seed=0)
            test, fresh = s.test.tensors, s.val.tensors
            cors = self._corruptions()
            key = "all" if cors == list(IMAGENET_C) else "-".join(cors)
            root = _bench_cache() / f"digits_s0_sev{''.join(map(str, sev))}_{key}"
            if not root.is_dir():
                self.log(f"writing EasyRobust-layout benchmark folders to {root} (once; cached)")
                write_benchmark_folders(root, test, fresh=fresh, severities=sev, corruptions=cors,
                                        progress=self.progress)
            if cfg["eval"].get("surrogate_sets"):
                from .surrogate_sets import ensure_surrogate_sets
                if not ((root / "damagenet").is_dir() and (root / "imagenet-a").is_dir()):
                    self.log("building the DamageNet-style and ImageNet-A-style sets from independent surrogates "
                             "(once; cached)")
                ensure_surrogate_sets(root, test, progress=self.progress)
        else:
            root = Path(cfg["data"])
            if not (root / "imagenet-val").is_dir():
                raise NSPluginError(f"data folder {root} has no imagenet-val/; lay it out as EasyRobust's benchmarks/data "
                                    f"(imagenet-val, imagenet-c, imagenet-a, imagenet-r, imagenet-sketch, imagenetv2, "
                                    f"imagenet-style) and training images in train/")
            test = tensors(image_folder(root / "imagenet-val"))
        return root, test

    def _corruptions(self) -> List[str]:
        c = self.cfg["eval"]["corruptions"]
        if c == "all":
            return list(IMAGENET_C)
        bad = [n for n in c if n not in IMAGENET_C]
        if bad:
            raise NSPluginError(f"unknown corruption {bad[0]!r} in eval.corruptions; known: {', '.join(IMAGENET_C)}")
        return list(c)

    # -- fine-tuning ----------------------------------------------------------------------------------------
    def finetune(self, run: Dict[str, Any]) -> Path:
        from ..checkpoint import save_checkpoint
        from ..training import load_config, train
        ck = self.out / "checkpoints" / f"{_slug(run['name'])}.pth"
        if ck.is_file():
            return ck
        t0 = time.time()
        if run.get("method") is None:
            from ..training.loop import build_model
            cfgt = load_config(None, method="standard", model=self.cfg["model"], data=self.cfg["data"],
                               seed=self.cfg["seed"], progress=self.progress)
            model = build_model(cfgt, progress=self.progress)
            save_checkpoint(ck, model, meta={"arch": _arch(self.cfg), "run": run["name"], "method": None})
            self._timing(run["name"], finetune_seconds=0.0)
            return ck
        overrides = dict(self.cfg["training"])
        overrides.update({k: v for k, v in run.items() if k != "name"})
        overrides.update(model=self.cfg["model"], data=self.cfg["data"], seed=self.cfg["seed"],
                         progress=self.progress)
        cfgt = load_config(None, **overrides)
        work = self.out / "runs" / _slug(run["name"])
        resume = (work / "last.pth").is_file()
        summary = train(cfgt, work, resume=resume)
        model, ema = summary["model"], summary.get("ema")
        save_checkpoint(ck, model, ema=ema, meta={"arch": _arch(self.cfg), "run": run["name"],
                                                  "method": run["method"], "train_config": cfgt.to_dict()})
        self._timing(run["name"], finetune_seconds=round(time.time() - t0, 2))
        return ck

    def _timing(self, name: str, **kw) -> None:
        path = self.out / "timings.json"
        t = json.loads(path.read_text()) if path.is_file() else {}
        t.setdefault(name, {}).update(kw)
        _write_json(path, t)

    # -- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self, run: Dict[str, Any], ck: Path, root: Path, test) -> Dict[str, Any]:
        from .stats import bits
        from .suite import SHIFT_FOLDERS, attack_correct, corruption_accuracies, correct_mask, folder_accuracy
        path = self.out / "evals" / f"{_slug(run['name'])}.json"
        if path.is_file():
            return json.loads(path.read_text())
        ev = self.cfg["eval"]
        model = _load(ck)
        res: Dict[str, Any] = {"name": run["name"], "notes": {}, "seed": self.cfg["seed"], "per_image": {}}
        torch_seed(self.cfg["seed"])          # attacks with random starts (PGD) are seeded by the run's seed
        t0 = time.time()
        res["Clean"] = folder_accuracy(model, root / "imagenet-val", engine="easyrobust")
        res["clean_images_per_s"] = round(len(test[1]) / max(time.time() - t0, 1e-9), 1)
        res["per_image"]["Clean"] = bits(correct_mask(model, test[0], test[1]))
        n_att = ev["n_attack"] or len(test[1])   # None: the whole test split
        x, y = test[0][:n_att], test[1][:n_att]
        res["n_attack"] = int(len(y))
        res["clean_attack_subset"] = 100.0 * float(correct_mask(model, x, y).float().mean())  # attacks use these
        for col, atk in self._attacks(model).items():
            if isinstance(atk, str):
                res[col], res["notes"][col] = None, atk
                continue
            ok, ips = attack_correct(model, atk, x, y)
            res[col], res[f"{col}_images_per_s"] = 100.0 * float(ok.float().mean()), round(ips, 1)
            res["per_image"][col] = bits(ok)
        dn = ev.get("damagenet") or (root / "damagenet" if (root / "damagenet").is_dir() else None)
        if dn and Path(dn).is_dir():
            res["DamageNet"] = folder_accuracy(model, dn, engine="fast")
            if self.cfg["data"] == "digits":
                from .suite import folder_tensors
                res["per_image"]["DamageNet"] = bits(correct_mask(model, *folder_tensors(dn)))
        else:
            res["DamageNet"], res["notes"]["DamageNet"] = None, "skipped: no DamageNet folder configured"
        res["corruptions"] = corruption_accuracies(model, root / "imagenet-c", engine=ev["engine"],
                                                   corruptions=self._corruptions())
        n_cls = int(next(v for k, v in model.state_dict().items() if k.endswith("head.weight")).shape[0])
        for folder, (evaluator, col) in SHIFT_FOLDERS.items():
            if n_cls != 1000 and evaluator in ("evaluate_imagenet_a", "evaluate_imagenet_r"):
                evaluator = "evaluate_imagenet_val"  # their 200-class masks assume 1000 ImageNet logits
            acc = folder_accuracy(model, root / folder, engine="easyrobust", evaluator=evaluator)
            res[col] = acc
            if acc is None:
                res["notes"][col] = f"skipped: no {folder}/ folder"
            elif self.cfg["data"] == "digits":     # small folders: per-image results for the paired tests
                from .suite import folder_tensors
                res["per_image"][col] = bits(correct_mask(model, *folder_tensors(root / folder)))
        res["eval_seconds"] = round(time.time() - t0, 2)
        _write_json(path, res)
        return json.loads(path.read_text())  # the same (JSON-typed) record whether fresh or resumed

    def _attacks(self, model) -> Dict[str, Any]:
        import torchattacks
        ev = self.cfg["eval"]
        out: Dict[str, Any] = {"FGSM": torchattacks.FGSM(model, eps=ev["fgsm_eps"]),
                               "PGD": torchattacks.PGD(model, **ev["pgd"]),
                               "CW": torchattacks.CW(model, **ev["cw"])}
        try:
            from ..attacks import PatchFool
            out["PatchFool"] = PatchFool(model, **(ev["patchfool"] or {}))
        except NSPluginError as e:
            out["PatchFool"] = f"skipped: {e}"
        if ev.get("autoattack"):
            from .. import compat
            compat.ensure_autoattack()
            from autoattack import AutoAttack

            class _AA:  # the torchattacks call convention over robustbench's AutoAttack
                def __init__(self, m, eps, version):
                    self.aa = AutoAttack(m, norm="Linf", eps=eps, version=version, device="cpu", verbose=False)

                def __call__(self, xb, yb):
                    return self.aa.run_standard_evaluation(xb, yb, bs=len(xb))
            out["AutoAttack"] = _AA(model, ev["autoattack"]["eps"], ev["autoattack"].get("version", "standard"))
        return out

    # -- outputs --------------------------------------------------------------------------------------------
    def tables(self, evals: Dict[str, Dict[str, Any]], partial: bool) -> str:
        from .suite import mce, paper_average
        base = evals.get(self.baseline_name)
        rows = {}
        for name, e in evals.items():
            r = {c: e.get(c) for c in TABLE2_COLS}
            r["C"] = mce(e["corruptions"], base["corruptions"]) if base and e.get("corruptions") else None
            rows[name] = r
        avg_cols = [c for c in TABLE2_COLS if c != "PGD"]  # the paper's average has no PGD column
        for r in rows.values():
            r["Average"] = paper_average(r, [c for c in avg_cols if any(rr.get(c) is not None for rr in rows.values())])
        md = io.StringIO()
        flag = " (PARTIAL: the run was interrupted; resume to complete)" if partial else ""
        md.write(f"# {self.cfg['name']}: robustness comparison{flag}\n\n")
        md.write(f"Attacks run on the first {self.cfg['eval']['n_attack'] or 'all'} test images (FGSM ε={self.cfg['eval']['fgsm_eps'] * 255:.3g}/255, "
                 f"PGD ε={self.cfg['eval']['pgd']['eps'] * 255:.3g}/255 x{self.cfg['eval']['pgd']['steps']}, CW L2 c={self.cfg['eval']['cw']['c']}, "
                 f"PatchFool {self.cfg['eval']['patchfool'].get('patches', 1)} patch); Clean is the whole test set. ")
        md.write(f"C is the mCE against the baseline run ({self.baseline_name!r} = 100), lower is better; the "
                 f"Average is the paper's: the mean over the columns with values, C entering as 100 - mCE "
                 f"(PGD, our extra column, is left out of it). Empty cells were skipped (see notes).\n\n")
        tabs = self.cfg["tables"]

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
            _write_csv(self.out / f"{key}.csv", ["Method"] + cols, out_rows)

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
            _write_csv(self.out / "table4.csv", ["eps", "Fine-tuning"] + TABLE4_COLS, out_rows)
        notes = sorted({f"{c}: {v}" for e in evals.values() for c, v in e.get("notes", {}).items()})
        if notes:
            md.write("Notes:\n" + "".join(f"- {n}\n" for n in notes) + "\n")
        timings = json.loads((self.out / "timings.json").read_text()) if (self.out / "timings.json").is_file() else {}
        md.write("## Cost\n\n| Run | fine-tune s | eval s | clean img/s | PGD img/s |\n|---|---|---|---|---|\n")
        for n, e in evals.items():
            md.write(f"| {n} | {timings.get(n, {}).get('finetune_seconds', '')} | {e.get('eval_seconds', '')} | "
                     f"{e.get('clean_images_per_s', '')} | {e.get('PGD_images_per_s', '')} |\n")
        text = md.getvalue()
        _write_text(self.out / "tables.md", text)
        _write_json(self.out / "rows.json", rows)
        return text

    def leaderboard(self, evals: Dict[str, Dict[str, Any]], rows: Dict[str, Dict[str, Any]]) -> None:
        """robustbench ``model_info`` entries (Linf and corruptions boards) for each run."""
        ev = self.cfg["eval"]
        for name, e in evals.items():
            r = rows[name]
            common = {"link": "", "name": name, "authors": "ns_plugin demo", "additional_data": False,
                      "number_forward_passes": 1, "dataset": f"{self.cfg['data']} (embedded)" if self.cfg["data"] == "digits" else "imagenet",
                      "venue": "ns_plugin", "architecture": _arch(self.cfg), "reported": False,
                      "clean_acc": _pct(r["Clean"])}
            robust = e.get("AutoAttack")
            _write_json(self.out / "leaderboard" / "Linf" / f"{_slug(name)}.json",
                        dict(common, eps=f"{ev['pgd']['eps'] * 255:.0f}/255",
                             autoattack_acc=_pct(robust) if robust is not None else "",
                             external=_pct(e.get("PGD")),
                             footnote="autoattack_acc empty unless eval.autoattack is set; external = PGD-10"))
            corr = e.get("corruptions") or {}
            mean_c = sum(sum(s.values()) / len(s) for s in corr.values()) / len(corr) if corr else None
            _write_json(self.out / "leaderboard" / "corruptions" / f"{_slug(name)}.json",
                        dict(common, eps=None, corruptions_acc=_pct(mean_c), corruptions_mce=_pct(r["C"])))

    def plots(self) -> Optional[Path]:
        """All runs' per-round curves in one figure (Fig. 4 style: each metric normalised to its start)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        logs = {}
        for run in self.cfg["runs"]:
            p = self.out / "runs" / _slug(run["name"]) / "log.json"
            if p.is_file():
                logs[run["name"]] = json.loads(p.read_text())
        if not logs:
            return None
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
        from ..io import atomic_savefig
        try:
            return atomic_savefig(fig, self.out / "training_curves.png", dpi=110)
        finally:
            plt.close(fig)

    def register_models(self) -> List[str]:
        """Register every checkpoint as a timm model ``ns_<config>_<run>`` (and robustbench's form)."""
        from ..registry import register_checkpoint
        names = []
        for run in self.cfg["runs"]:
            ck = self.out / "checkpoints" / f"{_slug(run['name'])}.pth"
            if ck.is_file():
                names += register_checkpoint(f"ns_{_slug(self.cfg['name'])}_{_slug(run['name'])}", ck)
        return names

    # -- orchestration --------------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        from tqdm.auto import tqdm
        status = self.claim()
        if status == "complete":
            self.log(f"{self.out} already holds this run (complete); reporting it")
        elif status != "new":
            self.log(f"resuming the {status} run in {self.out}")
        t0 = time.time()
        evals: Dict[str, Dict[str, Any]] = {}
        with _Interruptible() as stop:
            try:
                root, test = self.data()
                for run in tqdm(self.cfg["runs"], desc="fine-tune + evaluate", disable=not self.progress):
                    stop.check()
                    ck = self.finetune(run)
                    stop.check()
                    evals[run["name"]] = self.evaluate(run, ck, root, test)
                stop.check()
            except KeyboardInterrupt:
                self._state("partial")
                if evals:
                    self.tables(evals, partial=True)
                raise
        text = self.tables(evals, partial=False)
        rows = json.loads((self.out / "rows.json").read_text())
        self.leaderboard(evals, rows)
        self.plots()
        registered = self.register_models()
        summary = {"config_hash": self.hash, "seconds_this_call": round(time.time() - t0, 1),
                   "rows": {n: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                            for n, r in rows.items()}, "timm_models": registered}
        _write_json(self.out / "summary.json", summary)
        self._state("complete")
        return {"tables": text, **summary}


class _Interruptible:
    """Ctrl-C during a comparison always ends it as "partial". The SIGINT handler records the request and
    raises KeyboardInterrupt as usual, but a KeyboardInterrupt raised inside a finaliser (e.g. a DataLoader
    shutting its workers down) is swallowed by Python; :meth:`check` at every step boundary raises it again.
    Installed only in the main thread; the previous handler is restored on exit."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handler(self, signum, frame):
        self.requested = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        import signal
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _bench_cache() -> Path:
    from ..embedded import cache_dir
    return cache_dir() / "bench"


def _arch(cfg: Dict[str, Any]) -> str:
    return "ns_vit_digits" if cfg["model"] == "default" else cfg["model"]


def _load(ck: Path):
    from ..checkpoint import load_into, read_checkpoint
    from ..models import build_default_model
    ckpt = read_checkpoint(ck)
    arch = ckpt["meta"].get("arch")
    if arch == "ns_vit_digits":
        model = build_default_model()
    else:
        import timm
        from ..models import wrap
        k = ckpt["state_dict"]["1.head.weight"].shape[0]
        model = wrap(timm.create_model(arch, pretrained=False, num_classes=k), [0.0] * 3, [1.0] * 3)
    return load_into(model, ckpt["state_dict"], source=str(ck)).eval()


def _pct(v: Optional[float]) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _write_csv(path: Path, header: List[str], rows: List[List[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    _write_text(path, buf.getvalue())


def torch_seed(seed: int) -> None:
    import torch
    torch.manual_seed(int(seed))


def run_comparison(cfg: Dict[str, Any], out: os.PathLike, *, progress: bool = True, log=print) -> Dict[str, Any]:
    """Run (or resume) a comparison into ``out``; returns the tables text and the summary. With ``seeds`` of
    two or more, every seed is a complete comparison in ``out/seed_<s>/`` and ``out/`` gets the tables over
    seeds with paired tests (:mod:`ns_plugin.evaluation.seeds`)."""
    seeds = cfg.get("seeds")
    if seeds is not None and len(seeds) > 1:
        from .seeds import run_seeded
        return run_seeded(cfg, out, progress=progress, log=log)
    if seeds:
        cfg = dict(cfg, seed=seeds[0])
    cfg = {k: v for k, v in cfg.items() if k != "seeds"}
    return Comparison(cfg, out, progress=progress, log=log).run()
