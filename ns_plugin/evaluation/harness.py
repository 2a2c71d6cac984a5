"""The comparison harness behind ``ns-plugin demo`` and ``benchmarks/compare.py`` (arXiv:2403.10476 Tables 2-4, Fig. 4).

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

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import NSPluginError
from .corruptions import IMAGENET_C
from .report import TABLE2_COLS, TABLE3_COLS, TABLE4_COLS  # noqa: F401 (the tables' columns, re-exported)
from .report import arch_name as _arch
from .report import slug as _slug

#: The demo configuration shipped as package data (every method of the paper on digits + tiny ViT over 3 seeds:
#: 28 min on 2 cores); comparison configs that say ``base: demo`` start from it.
logger = logging.getLogger(__name__)

DEMO_CONFIG_FILE = "configs/demo.yaml"


def demo_config() -> Dict[str, Any]:
    """A fresh copy of the demo configuration, read from ``ns_plugin/configs/demo.yaml``."""
    from importlib.resources import files
    import yaml
    return yaml.safe_load(files("ns_plugin").joinpath(DEMO_CONFIG_FILE).read_text(encoding="utf-8"))


#: eval keys of the data pipeline (test transform, attacked subset, loaders, EMA, rank waits); see demo.yaml
_PIPELINE_KEYS = ("crop_pct", "attack_seed", "batch_size", "attack_batch_size", "workers", "use_ema", "wait_timeout")

#: What a comparison file starts from unless it says ``base: demo``: the papers' settings. Training keys it
#: omits take :class:`ns_plugin.training.TrainConfig`'s defaults (the paper's, see ``DEFAULT_SOURCES``);
#: ``name``, ``data``, ``model`` and ``runs`` must be given. Nothing of the demo's miniature settings leaks in.
PAPER_BASE: Dict[str, Any] = {
    "seed": 0,
    "training": {},
    "eval": {"n_attack": 5000, "fgsm_eps": 1 / 255, "pgd": {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10},
             "cw": {"c": 1.0, "steps": 50, "lr": 0.01}, "patchfool": {"patches": 1, "steps": 250},
             "autoattack": None, "damagenet": None, "engine": "easyrobust", "severities": [1, 2, 3, 4, 5],
             "corruptions": "all", "skip": [], "attack_seed": 0},
    "tables": {},
}
#: where each PAPER_BASE eval value comes from (recorded in config.json)
PAPER_EVAL_SOURCES = {
    "fgsm_eps": "NS-ViT paper App. C (FGSM eps 1/255, as Mao et al. 2022)",
    "pgd": "ns_plugin extra column (PGD-10 at 8/255, step 2/255; the paper reports no PGD)",
    "cw": "ns_plugin default (the paper does not give CW settings)",
    "patchfool": "ns_plugin default (PatchFool: 1 patch, 250 steps; the paper does not give them)",
    "n_attack": "ns_plugin default (attacks on 5000 validation images)",
    "attack_seed": "ns_plugin default (a fixed seeded index list of the validation images, as robustbench fixes its 5,000)",
    "engine": "EasyRobust evaluators",
    "severities": "ImageNet-C (Hendrycks & Dietterich): 5 severities",
    "corruptions": "ImageNet-C: the 15 corruptions of the mCE",
}
_REQUIRED = ("name", "data", "model", "runs")


# ----------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------
def load_comparison_config(path: Optional[os.PathLike] = None, *, check_paths: bool = True,
                           **overrides) -> Dict[str, Any]:
    """The demo config (no ``path``), or a YAML file's, validated (:func:`validate_config`;
    ``check_paths=False`` skips the existence checks of data folders, for a config written for another
    machine: :func:`run_comparison` checks everything again before any work, see :mod:`.preflight`).

    A file starts from :data:`PAPER_BASE` (the papers' settings) unless it says ``base: demo``, in which
    case the keys it omits take the demo's values (:func:`demo_config`: the miniature on digits)."""
    new: Dict[str, Any] = {}
    if path is not None:
        from ..io import read_yaml_mapping
        new = read_yaml_mapping(path)
    base = overrides.get("base", new.get("base", "demo" if path is None else "paper"))
    if base not in ("demo", "paper"):
        raise NSPluginError(f"base must be 'paper' or 'demo', got {base!r}")
    if base == "paper":
        absent = [k for k in _REQUIRED if k not in new and k not in overrides]
        if absent:
            raise NSPluginError(f"comparison config {path} lacks {', '.join(absent)}; give them, or add "
                                f"base: demo to start from the demo's settings")
    cfg = demo_config() if base == "demo" else copy.deepcopy(PAPER_BASE)
    cfg["base"] = base
    _merge(cfg, new)
    _merge(cfg, overrides)
    if check_paths:
        return validate_config(cfg)
    from ..validation import without_path_checks
    with without_path_checks():
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


def _compare_spec() -> Dict[str, Any]:
    """The check of every comparison-config key (:mod:`ns_plugin.validation`); new keys are added here."""
    from ..training.config import TRAIN_SPEC, check_model_name
    from ..validation import (Bool, Choice, Custom, Float, Int, ListOf, Mapping_, OneOf, PathCheck, Str)
    train = {k: v for k, v in TRAIN_SPEC.items() if k not in ("method", "model", "data")}
    run = dict(train, name=Str(), method=Str(optional=True))
    unit = Float(0, 1, lo_open=True)
    from .preflight import ALL_COLUMNS
    return {
        "name": Str(), "base": Choice("paper", "demo"),
        "data": PathCheck("dir", special=("digits",)),
        "model": Custom(lambda v, w: _check_vit(check_model_name(Str()(v, w), w), w), "'default' or a timm ViT name"),
        "seed": Int(0),
        "seeds": Custom(lambda v, w: _check_seeds(v), "a list of distinct non-negative integers, e.g. [0, 1, 2]",
                        optional=True),
        "training": Mapping_(train),
        "runs": ListOf(Custom(lambda v, w: _check_run(v, w, run), "a run mapping"), min_len=1),
        "eval": Mapping_({
            "n_attack": Int(1, optional=True), "fgsm_eps": unit,   # null: the whole test split
            "pgd": Mapping_({"eps": unit, "alpha": unit, "steps": Int(1), "random_start": Bool()}),
            "cw": Mapping_({"c": Float(0, lo_open=True), "kappa": Float(0), "steps": Int(1),
                            "lr": Float(0, lo_open=True)}),
            "patchfool": Mapping_({"patches": Int(1), "eps": Float(0, 1, lo_open=True, optional=True),
                                   "steps": Int(1), "lr": Float(0, lo_open=True), "gamma": Float(0, 1, lo_open=True),
                                   "attn_weight": Float(0), "select_layer": Int(0, optional=True),
                                   "attn_layers": ListOf(Int(0), min_len=1, optional=True),
                                   "sparse_pixels": Int(1, optional=True), "random_start": Bool()},
                                  optional=True),
            "autoattack": Mapping_({"eps": unit, "version": Choice("standard", "plus", "rand")}, optional=True),
            "damagenet": PathCheck("dir", optional=True),
            "leaderboard_dataset": Str(optional=True),
            "engine": Choice("fast", "easyrobust"),
            "severities": ListOf(Int(1, 5), min_len=1),
            "corruptions": OneOf(Choice("all"), ListOf(Choice(*IMAGENET_C), min_len=1)),
            "crop_pct": Float(0, 1, lo_open=True, optional=True), "attack_seed": Int(0, optional=True),
            "batch_size": Int(1), "attack_batch_size": Int(1), "workers": Int(0, optional=True),
            "use_ema": Bool(), "wait_timeout": Int(1),
            "skip": ListOf(Choice(*[c for c in ALL_COLUMNS if c != "Clean"]), optional=True),
            "surrogate_sets": Bool(optional=True),
        }),
        "tables": Mapping_({"table2": ListOf(Str()), "table3": ListOf(Str()),
                            "table4": ListOf(ListOf(Custom(_cell, "a text or number"), length=3))}),
    }


def _check_seeds(v):
    from .seeds import check_seeds
    return check_seeds(v)


def _check_run(r, where, spec):
    from ..validation import Str, validate
    if not isinstance(r, dict) or "name" not in r:
        raise NSPluginError(f"{where} must be a mapping with a name (and a method, null for the baseline), got {r!r}")
    name = Str()(r["name"], f"{where}.name")
    return validate(r, spec, f"run {name!r}", prefix=f"run {name!r}:")


def _cell(v, where):
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise NSPluginError(f"{where} must be a text or a number, got {v!r}")
    return v


def _check_vit(name: str, where: str = "model") -> str:
    """The comparison fine-tunes with encoder-level nullspace noise and runs PatchFool: it needs a ViT (a
    model with a patch embedding). Checked on the meta device (no weights, no download): milliseconds."""
    if name == "default":
        return name
    import timm
    import torch
    try:
        with torch.device("meta"):
            net = timm.create_model(name, pretrained=False)
    except Exception:  # noqa: BLE001 - some models cannot be built on the meta device: checked when built
        return name
    if getattr(net, "patch_embed", None) is None:
        raise NSPluginError(f"{where} {name!r} is not a vision transformer (no patch embedding); the comparison "
                            f"needs a ViT such as vit_tiny_patch16_224, or 'default'")
    return name


def validate_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The whole comparison config in one pass, in seconds, before any work: every key's type and range
    (:func:`_compare_spec`), unique run names, registered methods, tables naming existing runs, and each
    run's complete training config (so ``training: {rounds: abc}`` fails now, not after the baseline)."""
    from ..training import config as tc
    from ..training import trainers
    from ..validation import validate

    if isinstance(cfg.get("eval"), dict):   # a config built on another base takes demo.yaml's pipeline defaults
        demo_ev = demo_config()["eval"]
        for k in _PIPELINE_KEYS:
            cfg["eval"].setdefault(k, copy.deepcopy(demo_ev[k]))
    cfg = validate(cfg, _compare_spec(), "the comparison config", prefix="")
    for k in ("name", "data", "model", "seed", "training", "runs", "eval", "tables"):
        if k not in cfg:
            raise NSPluginError(f"the comparison config needs the key {k!r}")
    from ..validation import _CHECK_PATHS
    if cfg["data"] != "digits" and _CHECK_PATHS.get() and not (Path(cfg["data"]) / "imagenet-val").is_dir():
        raise NSPluginError(f"data folder {cfg['data']} has no imagenet-val/; lay it out as EasyRobust's benchmarks/data "
                            f"(imagenet-val, imagenet-c, imagenet-a, imagenet-r, imagenet-sketch, imagenetv2, "
                            f"imagenet-style) and training images in train/")
    names = set()
    for r in cfg["runs"]:
        if r["name"] in names:
            raise NSPluginError(f"run name {r['name']!r} appears twice")
        names.add(r["name"])
        if r.get("method") is not None:
            trainers.get(r["method"])
            d = dict(cfg["training"])
            d.update({k: v for k, v in r.items() if k != "name"})
            d.update(model=cfg["model"], data=cfg["data"], seed=cfg["seed"])
            try:
                tc.TrainConfig.from_dict(d).validate()
            except NSPluginError as e:
                raise NSPluginError(f"run {r['name']!r}: {e}") from None
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


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------
class Comparison:
    """One comparison run in a results folder (see the module docstring)."""

    def __init__(self, cfg: Dict[str, Any], out: os.PathLike, *, progress: bool = True, log=None,
                 preflight: bool = True):
        self.cfg = validate_config(copy.deepcopy(cfg))
        self.out = Path(out)
        self.progress = progress
        self.log = log if log is not None else logger.info  # library messages go through logging
        self.check_first = preflight   # False: the caller ran the preflight (a comparison over seeds)
        self.hash = config_hash(self.cfg)
        self.baseline_name = self.cfg["runs"][0]["name"]
        self.ranks = _Ranks(1, 0, None)
        self.device = None
        self._datasets: Dict[str, Any] = {}

    # -- results folder ownership ---------------------------------------------------------------------------
    def claim(self) -> str:
        """Take the results folder: new, or a run of the same config (resumed). Another run is refused."""
        state = self.out / "run.json"
        from ..io import LOCK_NAME
        if self.out.exists() and any(p.name != LOCK_NAME for p in self.out.iterdir()):
            if not state.is_file():
                raise NSPluginError(f"{self.out} exists and is not an ns_plugin results folder; choose another --out")
            prev = json.loads(state.read_text())
            if prev.get("config_hash") != self.hash:
                raise NSPluginError(f"{self.out} holds another run (config {prev.get('config_hash')}, this one "
                                    f"{self.hash}); choose another --out or remove it (results are never mixed)")
            status = prev.get("status", "partial")
        else:
            status = "new"
        self._state("running")   # run.json first: a folder with config.json alone is never left
        _write_json(self.out / "config.json", dict(self.cfg, resolved=self.resolved()))
        return status

    def _state(self, status: str, **extra) -> None:
        path = self.out / "run.json"
        prev = json.loads(path.read_text()) if path.is_file() else {}
        if status != "failed":
            prev.pop("error", None)
        if status != "partial":
            prev.pop("reason", None)
        prev.update({"config_hash": self.hash, "status": status, "updated": time.strftime("%Y-%m-%d %H:%M:%S")},
                    **extra)
        _write_json(path, prev)

    # -- data -----------------------------------------------------------------------------------------------
    def data(self) -> Path:
        """The root of the EasyRobust-layout folders. Digits: written once (rank 0) into the cache. Nothing is
        loaded here: every column is read lazily through DataLoaders, so memory does not grow with the folders."""
        from .corruptions import write_benchmark_folders
        cfg = self.cfg
        sev = list(cfg["eval"]["severities"])
        if cfg["data"] == "digits":
            from ..data import load_digits
            cors = self._corruptions()
            key = "all" if cors == list(IMAGENET_C) else "-".join(cors)
            root = _bench_cache() / f"digits_s0_sev{''.join(map(str, sev))}_{key}_r3"  # r3: rendition/, natural-adversarial/

            def write():
                s = load_digits(seed=0)
                if not root.is_dir():
                    self.log(f"writing EasyRobust-layout benchmark folders to {root} (once; cached)")
                    write_benchmark_folders(root, s.test.tensors, fresh=s.val.tensors, severities=sev,
                                            corruptions=cors, progress=self.progress)
                if cfg["eval"].get("surrogate_sets"):
                    from .surrogate_sets import ensure_surrogate_sets
                    from .surrogate_sets import A_STYLE_FOLDER
                    if not ((root / "damagenet").is_dir() and (root / A_STYLE_FOLDER).is_dir()):
                        self.log("building the DamageNet-style and ImageNet-A-style sets from independent "
                                 "surrogates (once; cached)")
                    ensure_surrogate_sets(root, s.test.tensors, progress=self.progress)
            self.ranks.main_value(write)
            return root
        root = Path(cfg["data"])
        if not (root / "imagenet-val").is_dir():
            raise NSPluginError(f"data folder {root} has no imagenet-val/; lay it out as EasyRobust's benchmarks/data "
                                f"(imagenet-val, imagenet-c, imagenet-a, imagenet-r, imagenet-sketch, imagenetv2, "
                                f"imagenet-style) and training images in train/")
        return root

    def transform(self, model):
        """The test transform: EasyRobust ``benchmarks/benchmark.py``'s (resize to input / crop_pct, centre crop,
        bicubic; crop_pct 0.875 unless ``eval.crop_pct`` says otherwise). Digits' folders are already 32x32."""
        from ..data import EVAL_CROP_PCT, ToFloat, eval_transform
        from ..models import input_size
        if self.cfg["data"] == "digits":
            return ToFloat()
        size = (input_size(model) or (3, 224, 224))[1]
        return eval_transform(int(size), self.cfg["eval"]["crop_pct"] or EVAL_CROP_PCT)

    def dataset(self, path: Path, transform):
        """The folder at ``path`` as a dataset, scanned once per run (reused by every model)."""
        from ..data import image_folder
        key = str(path)
        if key not in self._datasets:
            self._datasets[key] = image_folder(path, transform=transform)
        return self._datasets[key]

    def attack_set(self, root: Path, transform):
        """The attacked subset: ``eval.n_attack`` images of the clean test set, by a fixed index list (seeded by
        ``eval.attack_seed``, the first ones when null, as robustbench fixes its 5,000 ImageNet images), read
        lazily. Digits: the in-memory test split (already a seeded stratified sample)."""
        from torch.utils.data import Subset, TensorDataset
        from ..data import subset_indices
        ev = self.cfg["eval"]
        if self.cfg["data"] == "digits":
            from ..data import load_digits
            ds = TensorDataset(*load_digits(seed=0).test.tensors)
        else:
            ds = self.dataset(root / "imagenet-val", transform)
        return Subset(ds, subset_indices(len(ds), ev["n_attack"], ev["attack_seed"]))

    def folder(self, model, path: Path, transform, evaluator: str = "evaluate_imagenet_val") -> Optional[float]:
        """Top-1 on one folder with ``eval.engine``: ``fast`` shards it over the ranks (counts summed);
        ``easyrobust`` runs EasyRobust's evaluator on rank 0 while the others wait (at most ``eval.wait_timeout``)."""
        from ..data import default_workers
        from .suite import folder_accuracy
        ev = self.cfg["eval"]
        if not Path(path).is_dir():
            return None
        if ev["engine"] == "easyrobust":
            return self.ranks.main_value(lambda: folder_accuracy(
                model, path, engine="easyrobust", evaluator=evaluator, batch_size=ev["batch_size"],
                transform=transform))
        workers = ev["workers"] if ev["workers"] is not None else (0 if self.cfg["data"] == "digits" else default_workers())
        return folder_accuracy(model, path, engine="fast", evaluator=evaluator, batch_size=ev["batch_size"],
                               transform=transform, workers=workers, dataset=self.dataset(path, transform))

    def _corruptions(self) -> List[str]:
        c = self.cfg["eval"]["corruptions"]
        if c == "all":
            return list(IMAGENET_C)
        bad = [n for n in c if n not in IMAGENET_C]
        if bad:
            raise NSPluginError(f"unknown corruption {bad[0]!r} in eval.corruptions; known: {', '.join(IMAGENET_C)}")
        return list(c)

    # -- settings of each run, with where each value comes from ---------------------------------------------
    def run_settings(self, run: Dict[str, Any]):
        """``(values, sources)``: every :class:`TrainConfig` value a run uses and where it came from (the run,
        the config's training block, the demo's block with ``base: demo``, or the documented default).
        Rows without a method are evaluated as built (pretrained / init weights), without training."""
        import dataclasses

        import torch

        from ..training.config import DEFAULT_SOURCES, TrainConfig
        tr, base = self.cfg["training"], self.cfg.get("base", "demo")
        demo_tr = demo_config()["training"]
        vals: Dict[str, Any] = {}
        src: Dict[str, str] = {}
        for f in dataclasses.fields(TrainConfig):
            k = f.name
            if k in ("model", "data", "seed"):
                vals[k], src[k] = self.cfg[k], "config"
            elif k == "method":
                vals[k], src[k] = run.get("method"), f"run {run['name']!r}"
            elif k == "progress":
                vals[k], src[k] = self.progress, "harness"
            elif k in run:
                vals[k], src[k] = run[k], f"run {run['name']!r}"
            elif k in tr:
                demo = base == "demo" and k in demo_tr and demo_tr[k] == tr[k]
                vals[k], src[k] = tr[k], ("demo training block (base: demo)" if demo else "config training block")
            else:
                vals[k] = copy.deepcopy(f.default if f.default is not dataclasses.MISSING else f.default_factory())
                src[k] = "default: " + DEFAULT_SOURCES.get(k, "ns_plugin default")
        if vals["init"] and vals["pretrained"]:
            src["pretrained"] += " (unused: the init checkpoint replaces every weight)"
        if vals["amp"] and not torch.cuda.is_available():
            vals["amp"], src["amp"] = False, f"{src['amp']} asked for amp: true; no CUDA here, so it runs in fp32"
        return vals, src

    def resolved(self) -> Dict[str, Any]:
        """What config.json records besides the config: every run's settings and their sources."""
        out: Dict[str, Any] = {"base": self.cfg.get("base", "demo"), "runs": {}, "eval": {}}
        source_keys = ("model", "pretrained", "init", "init_ema", "num_classes", "data", "seed")
        for run in self.cfg["runs"]:
            vals, src = self.run_settings(run)
            keys = list(vals) if run.get("method") is not None else source_keys
            out["runs"][run["name"]] = {k: {"value": vals[k], "from": src[k]} for k in keys}
            if run.get("method") is None:
                out["runs"][run["name"]]["evaluate_only"] = {"value": True, "from": "no method: evaluated as built"}
        for k, v in self.cfg["eval"].items():
            default = (PAPER_BASE if out["base"] == "paper" else demo_config())["eval"].get(k)
            where = ("paper base" if out["base"] == "paper" else "demo (base: demo)")
            out["eval"][k] = {"value": v, "from": (f"{where}: {PAPER_EVAL_SOURCES.get(k, 'default')}"
                                                   if v == default and out["base"] == "paper" else
                                                   where if v == default else "config eval block")}
        return out

    # -- fine-tuning ----------------------------------------------------------------------------------------
    def finetune(self, run: Dict[str, Any]) -> Path:
        """Fine-tune one row (every rank takes part under ``torchrun``); rank 0 writes its checkpoint. Returns
        the checkpoint path once the file is complete on disk (no rank reads it before)."""
        from ..checkpoint import save_checkpoint
        from ..training import load_config, train
        ck = self.out / "checkpoints" / f"{_slug(run['name'])}.pth"
        if self.ranks.main_value(ck.is_file):
            return ck
        t0 = time.time()
        vals, _ = self.run_settings(run)
        if run.get("method") is None:
            def baseline():
                # evaluated as built: the pretrained model / the init checkpoint the other rows start from
                import torch
                from ..training.loop import build_model
                cfgt = load_config(None, **dict(vals, method="standard"))
                torch.manual_seed(self.cfg["seed"])   # a randomly initialised baseline is a function of the seed
                model = build_model(cfgt, progress=self.progress)
                source = {k: vals[k] for k in ("pretrained", "init", "init_ema")}
                save_checkpoint(ck, model, meta={"arch": _arch(self.cfg), "run": run["name"], "method": None,
                                                 "source": source})
                self._timing(run["name"], finetune_seconds=0.0)
            self.ranks.main_value(baseline)
            return ck
        cfgt = load_config(None, **vals)
        work = self.out / "runs" / _slug(run["name"])
        resume = self.ranks.main_value((work / "last.pth").is_file)
        summary = train(cfgt, work, resume=resume)

        def save():
            model, ema = summary["model"], summary.get("ema")
            save_checkpoint(ck, model, ema=ema, meta={"arch": _arch(self.cfg), "run": run["name"],
                                                      "method": run["method"], "train_config": cfgt.to_dict()})
            self._timing(run["name"], finetune_seconds=round(time.time() - t0, 2))
        self.ranks.main_value(save)
        return ck

    def _timing(self, name: str, **kw) -> None:
        path = self.out / "timings.json"
        t = json.loads(path.read_text()) if path.is_file() else {}
        t.setdefault(name, {}).update(kw)
        _write_json(path, t)

    # -- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self, run: Dict[str, Any], ck: Path, root: Path) -> Dict[str, Any]:
        """Every column for one row, on the run's device, with the EMA weights when the row trained with EMA
        (``weights`` in the record says which). Under ``torchrun`` the attacked subset (and, with the fast
        engine, every folder) is sharded over the ranks and the counts summed; rank 0 writes the record."""
        from ..data import default_workers, make_loader
        import torch
        from .suite import SHIFT_FOLDERS, _sum_over_ranks, loader_counts, model_device, shard
        from .stats import bits
        from .suite import attack_correct, correct_mask
        path = self.out / "evals" / f"{_slug(run['name'])}.json"
        done = self.ranks.main_value(lambda: json.loads(path.read_text()) if path.is_file() else None)
        if done is not None:
            return done
        ev = self.cfg["eval"]
        model, weights = _load(ck, self.device, use_ema=ev["use_ema"])
        tf = self.transform(model)
        dev = model_device(model)
        res: Dict[str, Any] = {"name": run["name"], "notes": {}, "weights": weights, "device": str(dev),
                               "world_size": self.ranks.world, "engine": ev["engine"],
                               "precision": "fp32 (attacks fp32, no autocast; inference_mode for accuracies)",
                               "seed": self.cfg["seed"], "per_image": {}}
        t0 = time.time()
        res["Clean"] = self.folder(model, root / "imagenet-val", tf)
        n_val = len(self.dataset(root / "imagenet-val", tf))
        res["clean_images_per_s"] = round(n_val / max(time.time() - t0, 1e-9), 1)
        sub = shard(self.attack_set(root, tf), self.ranks.rank, self.ranks.world)
        workers = ev["workers"] if ev["workers"] is not None else (0 if self.cfg["data"] == "digits" else default_workers())
        loader = lambda: make_loader(sub, ev["attack_batch_size"], workers=workers, device=dev)  # noqa: E731
        c, n = loader_counts(model, loader())
        c, n = _sum_over_ranks(c, n, device=dev)
        res["clean_attack_subset"] = 100.0 * c / max(1, n)  # attacks run on these images only
        res["n_attack"] = int(n)
        if self.cfg["data"] == "digits":   # small in-memory split: per-image results for the paired tests
            from ..data import load_digits
            test = load_digits(seed=0).test.tensors
            res["per_image"]["Clean"] = bits(correct_mask(model, test[0], test[1]))
        skip = set(ev.get("skip") or [])
        for col in sorted(skip):
            res["notes"][col] = "skipped: listed in eval.skip"
        for col, atk in self._attacks(model).items():
            if col in skip:
                res[col] = None
                continue
            if isinstance(atk, str):
                res[col], res["notes"][col] = None, atk
                continue
            t_atk = time.time()
            with seeded(attack_seed(self.cfg["seed"], col)):  # the numbers are a function of config + seed
                oks = [attack_correct(model, atk, xb, yb, batch_size=len(yb))[0] for xb, yb in loader()]
                ok = torch.cat(oks) if oks else torch.zeros(0, dtype=torch.bool)
            ok = _gather_interleaved(ok, self.ranks)
            ips = len(ok) / max(time.time() - t_atk, 1e-9)
            res[col], res[f"{col}_images_per_s"] = 100.0 * float(ok.float().mean()), round(ips, 1)
            res["per_image"][col] = bits(ok)
        dn = ev.get("damagenet") or (root / "damagenet" if (root / "damagenet").is_dir() else None)
        if "DamageNet" in skip:
            res["DamageNet"] = None
        elif dn and Path(dn).is_dir():
            res["DamageNet"] = self.folder(model, Path(dn), tf)
            if self.cfg["data"] == "digits":
                from .suite import folder_tensors
                res["per_image"]["DamageNet"] = bits(correct_mask(model, *folder_tensors(dn)))
        else:
            res["DamageNet"], res["notes"]["DamageNet"] = None, "skipped: no DamageNet folder configured"
        res["corruptions"] = None if "C" in skip else {}
        for c_name in ([] if "C" in skip else self._corruptions()):
            for s_ in ev["severities"]:
                acc = self.folder(model, root / "imagenet-c" / c_name / str(s_), tf)
                if acc is not None:
                    res["corruptions"].setdefault(c_name, {})[s_] = acc
        n_cls = int(next(v for k, v in model.state_dict().items() if k.endswith("head.weight")).shape[0])
        for folder, (evaluator, col) in SHIFT_FOLDERS.items():
            if col in skip:
                res[col] = None
                continue
            if not (root / folder).is_dir() and any((root / f).is_dir() for f, (_, c) in SHIFT_FOLDERS.items()
                                                     if c == col and f != folder):
                continue  # the column's other folder holds it (imagenet-r / imagenet-a for 1000 classes)
            if n_cls != 1000 and evaluator in ("evaluate_imagenet_a", "evaluate_imagenet_r"):
                evaluator = "evaluate_imagenet_val"  # their 200-class masks assume 1000 ImageNet logits
            acc = self.folder(model, root / folder, tf, evaluator)
            res[col] = acc
            if acc is None:
                res["notes"][col] = f"skipped: no {folder}/ folder"
            elif self.cfg["data"] == "digits":     # small folders: per-image results for the paired tests
                from .suite import folder_tensors
                res["per_image"][col] = bits(correct_mask(model, *folder_tensors(root / folder)))
        res["eval_seconds"] = round(time.time() - t0, 2)
        res = json.loads(json.dumps(res, default=float))   # the same JSON-typed record fresh or resumed
        if self.ranks.main:
            _write_json(path, res)
        return res

    def _attacks(self, model) -> Dict[str, Any]:
        import torchattacks
        from .suite import model_device
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
            from ..integrations import robustbench as compat
            compat.ensure_autoattack()
            from autoattack import AutoAttack
            dev = str(model_device(model))

            class _AA:  # the torchattacks call convention over robustbench's AutoAttack
                def __init__(self, m, eps, version):
                    self.aa = AutoAttack(m, norm="Linf", eps=eps, version=version, device=dev, verbose=False)

                def __call__(self, xb, yb):
                    return self.aa.run_standard_evaluation(xb, yb, bs=len(xb))
            out["AutoAttack"] = _AA(model, ev["autoattack"]["eps"], ev["autoattack"].get("version", "standard"))
        return out

    # -- outputs --------------------------------------------------------------------------------------------
    def tables(self, evals: Dict[str, Dict[str, Any]], partial: bool) -> str:
        """Write ``tables.md``, ``table*.csv`` and ``rows.json`` (:func:`.report.tables_markdown`)."""
        from .report import cost_markdown, csv_text, table_rows, tables_markdown
        rows = table_rows(evals, self.baseline_name)
        timings = json.loads((self.out / "timings.json").read_text()) if (self.out / "timings.json").is_file() else {}
        text, csvs = tables_markdown(self.cfg, evals, rows, baseline=self.baseline_name, partial=partial)
        for key, table in csvs.items():
            _write_text(self.out / f"{key}.csv", csv_text(table))
        _write_text(self.out / "tables.md", text)
        _write_text(self.out / "cost.md", cost_markdown(evals, timings))
        _write_json(self.out / "rows.json", rows)
        return text

    def leaderboard(self, evals: Dict[str, Dict[str, Any]], rows: Dict[str, Dict[str, Any]]) -> None:
        """robustbench ``model_info`` entries (:func:`.report.leaderboard_entries`) under
        ``leaderboard/<dataset>/<threat>/`` and ``leaderboard/index.html`` (robustbench's table format)."""
        from .leaderboard import write_leaderboard_page
        from .report import leaderboard_entries
        source = ""
        if self.cfg["eval"].get("autoattack"):
            from ..integrations import robustbench as compat
            source = compat.ensure_autoattack()
        entries = leaderboard_entries(self.cfg, evals, rows, autoattack_source=source, baseline=self.baseline_name)
        for rel, entry in entries.items():
            _write_json(self.out / "leaderboard" / rel, entry)
        if entries:
            write_leaderboard_page(self.out / "leaderboard", title=f"ns_plugin comparison {self.cfg['name']!r}")

    def plots(self) -> Optional[Path]:
        """All runs' per-round curves in one figure (:func:`.report.training_curves_figure`)."""
        from .report import training_curves_figure
        logs = {}
        for run in self.cfg["runs"]:
            p = self.out / "runs" / _slug(run["name"]) / "log.json"
            if p.is_file():
                logs[run["name"]] = json.loads(p.read_text())
        fig = training_curves_figure(logs)
        if fig is None:
            return None
        import matplotlib.pyplot as plt
        from ..io import atomic_savefig
        try:
            return atomic_savefig(fig, self.out / "training_curves.png", dpi=110)
        finally:
            plt.close(fig)

    def register_models(self) -> List[str]:
        """Register every checkpoint as a timm model ``ns_<config>_<run>`` (and robustbench's form)."""
        from ..integrations.timm import register_checkpoint
        names = []
        for run in self.cfg["runs"]:
            ck = self.out / "checkpoints" / f"{_slug(run['name'])}.pth"
            if ck.is_file():
                try:
                    names += register_checkpoint(f"ns_{_slug(self.cfg['name'])}_{_slug(run['name'])}", ck)
                except NSPluginError as e:  # e.g. the same config run into another folder in this process:
                    logger.warning("not registered as a timm model: %s", e)   # the results stand; say so
        return names

    # -- orchestration --------------------------------------------------------------------------------------
    def preflight(self, *, network: bool = True):
        """Check every resource before anything is written or trained (:mod:`.preflight`): print the table,
        stop in one line when something required is missing, then download the ``init:`` URLs the runs
        need (once, into the torch hub cache) and check their class counts too."""
        from ..weights import fetch, init_status
        from .preflight import preflight, run_sources
        pf = preflight(self.cfg, self.out, network=network)
        self.log(pf.table())   # rank 0 only: run() calls this inside the rank protocol
        pf.raise_if_missing()
        urls = {s["init"] for s in run_sources(self.cfg) if s["init"]}
        todo = [u for u in sorted(urls) if init_status(u, network=False).state == "reachable"]
        for u in todo:
            fetch(u, progress=self.progress)
        if todo:  # now on disk: their class counts can be checked before any training
            pf = preflight(self.cfg, self.out, network=False)
            pf.raise_if_missing()
        return pf   # its warnings are rows of the table above (printed once, not repeated as log lines)

    def run(self) -> Dict[str, Any]:
        """Own the results folder and run or resume every row, then write the outputs.

        Rank 0 owns the folder (:func:`ns_plugin.io.claim_output`: a second comparison writing into it fails at
        once; the claim, checkpoints, records, tables); under ``torchrun`` every rank calls this: the others
        train with it (DDP), evaluate their shards and get rank 0's answers, never reading a file rank 0 is
        writing. A failure ends with ``run.json`` saying ``failed`` and why (``partial`` and the signal when
        interrupted)."""
        from ..io import claim_output
        with rank_session(self.cfg["eval"]["wait_timeout"]) as (self.ranks, self.device):
            with contextlib.ExitStack() as owned:
                def own() -> str:
                    state = self.out / "run.json"
                    if self.check_first and (not state.is_file()
                                             or json.loads(state.read_text()).get("status") != "complete"):
                        self.preflight()  # everything it needs, checked before anything is written
                    owned.enter_context(claim_output(self.out, what=f"ns-plugin comparison {self.cfg['name']!r}"))
                    return self.claim()
                status = self.ranks.main_value(own)
                try:
                    return self._run(status)
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - record why, then let it propagate unchanged
                    if self.ranks.main:
                        from ..errors import one_line
                        self._state("failed", error=one_line(e))
                    raise

    def _run(self, status: str) -> Dict[str, Any]:
        from tqdm.auto import tqdm
        main = self.ranks.main
        if main and status == "complete":
            self.log(f"{self.out} already holds this run (complete); reporting it")
        elif main and status != "new":
            self.log(f"resuming the {status} run in {self.out}")
        t0 = time.time()
        evals: Dict[str, Dict[str, Any]] = {}
        with _Interruptible() as stop:
            try:
                root = self.data()
                for run in tqdm(self.cfg["runs"], desc="fine-tune + evaluate", disable=not (self.progress and main)):
                    stop.check()
                    ck = self.finetune(run)
                    stop.check()
                    evals[run["name"]] = self.evaluate(run, ck, root)
                stop.check()
            except KeyboardInterrupt:
                if main:
                    self._state("partial", reason=f"interrupted ({stop.signal_name or 'KeyboardInterrupt'}); "
                                                  f"rerun the same command to resume")
                    if evals:
                        self.tables(evals, partial=True)
                raise
        return self.ranks.main_value(lambda: self._finish(evals, t0))

    def _finish(self, evals: Dict[str, Dict[str, Any]], t0: float) -> Dict[str, Any]:
        text = self.tables(evals, partial=False)
        rows = json.loads((self.out / "rows.json").read_text())
        self.leaderboard(evals, rows)
        self.plots()
        registered = self.register_models()
        summary = {"config_hash": self.hash, "seconds_this_call": round(time.time() - t0, 1),
                   "world_size": self.ranks.world,
                   "rows": {n: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                            for n, r in rows.items()}, "timm_models": registered}
        _write_json(self.out / "summary.json", summary)
        self._state("complete")
        return {"tables": text, **summary}


def _gather_interleaved(ok, ranks: "_Ranks"):
    """The per-image results of every rank's shard (items r, r + W, ...) back in subset order (rank 0 first)."""
    import torch
    if ranks.world == 1:
        return ok
    import torch.distributed as dist
    parts: List[Any] = [None] * ranks.world
    dist.all_gather_object(parts, ok.cpu().tolist(), group=ranks.group)
    n = sum(len(p) for p in parts)
    return torch.tensor([parts[i % ranks.world][i // ranks.world] for i in range(n)], dtype=torch.bool)


@contextlib.contextmanager
def rank_session(wait_timeout: int):
    """``(ranks, device)`` of this launch (:class:`_Ranks`; ``torchrun`` or one process); a process group it
    had to initialise is destroyed on exit. Used by a comparison and by a comparison over seeds (which opens
    the session once for all its seeds)."""
    import torch.distributed as dist
    from ..training.distributed import init_distributed
    owns_pg = not (dist.is_available() and dist.is_initialized())
    rank, world, device = init_distributed()
    try:
        yield _Ranks(world, rank, wait_timeout), device
    finally:
        if owns_pg and world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class _Ranks:
    """Who does what under ``torchrun``: rank 0 runs the steps that touch the results folder and every rank
    gets its answer (:meth:`main_value`); the others wait at most ``timeout`` seconds (``eval.wait_timeout``),
    on a gloo group of their own so the wait is bounded whatever the training backend. One process: plain
    calls."""

    def __init__(self, world: int, rank: int, timeout: Optional[int]):
        self.world, self.rank, self.timeout = world, rank, timeout
        self.main = rank == 0
        self.group = None
        if world > 1:
            from datetime import timedelta
            import torch.distributed as dist
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))

    def main_value(self, fn):
        """``fn()`` on rank 0, its result on every rank. An error on rank 0 is raised there and, as one line,
        on every other rank."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist
        box: List[Any] = [None]
        err: Optional[BaseException] = None
        if self.main:
            try:
                box[0] = ("ok", fn())
            except BaseException as e:  # noqa: BLE001 (re-raised below after the others are told)
                err = e
                box[0] = ("error", str(e) if isinstance(e, NSPluginError) else f"{type(e).__name__}: {e}")
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except RuntimeError as e:
            if err is not None:
                raise err
            raise NSPluginError(f"rank {self.rank} waited for rank 0 longer than eval.wait_timeout ({self.timeout} s) "
                                f"or rank 0 died ({str(e).splitlines()[0][:100]}); raise eval.wait_timeout or use "
                                f"eval.engine: fast (sharded)") from None
        if err is not None:
            raise err
        if box[0][0] == "error":
            raise NSPluginError(f"rank 0 failed: {box[0][1]}")
        return box[0][1]


class _Interruptible:
    """Ctrl-C during a comparison always ends it as "partial". The SIGINT handler records the request and
    raises KeyboardInterrupt as usual, but a KeyboardInterrupt raised inside a finaliser (e.g. a DataLoader
    shutting its workers down) is swallowed by Python; :meth:`check` at every step boundary raises it again.
    Installed only in the main thread; the previous handler is restored on exit."""

    def __init__(self):
        self.requested = False
        self.signal_name: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def _handler(self, signum, frame):
        import signal
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):   # torchrun stops its workers with SIGTERM
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        import signal
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _bench_cache() -> Path:
    from ..embedded import cache_dir
    return cache_dir() / "bench"


def _load(ck: Path, device=None, *, use_ema: bool = True):
    """``(model on device in eval mode, "ema" | "model")``: the EMA weights when the checkpoint has them (the
    row trained with ``model_ema``) and ``use_ema``, else the model's."""
    from ..checkpoint import read_checkpoint
    from ..models import create_model
    ema = bool(use_ema) and isinstance(read_checkpoint(ck).get("state_dict_ema"), dict)
    model = create_model(ck, use_ema=ema)
    return (model.to(device) if device is not None else model).eval(), ("ema" if ema else "model")


def attack_seed(seed: int, column: str) -> int:
    """The seed of one attack column: the same for every model of a comparison (equal random starts) and
    every run of the same config, so tables are reproducible, whatever ran before in the process."""
    return int(hashlib.sha256(f"{seed}:{column}".encode()).hexdigest()[:12], 16)


class seeded:
    """``with seeded(s):`` torch (CPU and CUDA), Python and NumPy RNGs seeded with ``s`` inside the block,
    and restored afterwards (the caller's random streams are left untouched)."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def __enter__(self):
        import random

        import numpy as np
        import torch
        self._fork = torch.random.fork_rng(devices=list(range(torch.cuda.device_count())))
        self._fork.__enter__()
        self._py, self._np = random.getstate(), np.random.get_state()
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        np.random.seed(self.seed % (2 ** 32))
        return self

    def __exit__(self, *exc):
        import random

        import numpy as np
        random.setstate(self._py)
        np.random.set_state(self._np)
        return self._fork.__exit__(*exc)


def run_comparison(cfg: Dict[str, Any], out: os.PathLike, *, progress: bool = True, log=None) -> Dict[str, Any]:
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
