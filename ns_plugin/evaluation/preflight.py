"""Fail fast: check everything a comparison will need before its first training step.

A paper-scale comparison ("Approximate Nullspace Augmented Finetuning for Robust Vision Transformers",
Tables 2-4) fine-tunes for hours; a missing VQGAN checkpoint or benchmark folder must not surface after
the first runs trained. :func:`preflight` looks at every resource without training and without
downloading: timm model names, pretrained weights (cached, or the hub reachable), ``init:`` checkpoints
(files, cached URLs, reachable URLs), class counts of checkpoints vs the data, the VQGAN of DAT runs, the
training folder and the folder of every benchmark column, a writable output folder, CUDA / GPU count vs
``world_size`` and ``amp``. It returns one table of present / missing / skipped / warning rows;
:meth:`Preflight.raise_if_missing` stops with one line naming the first missing item.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import NSPluginError

#: benchmark columns read from folders under the data root (EasyRobust's ``benchmarks/data`` layout)
COLUMN_FOLDERS = {"Clean": "imagenet-val", "C": "imagenet-c", "A": "imagenet-a", "R": "imagenet-r",
                  "Sketch": "imagenet-sketch", "V2": "imagenetv2", "Stylized": "imagenet-style"}
#: attack columns run on (a subset of) the clean images
ATTACK_COLUMNS = ("FGSM", "PGD", "CW", "PatchFool")
#: columns every comparison reports (eval.skip may name any of them)
ALL_COLUMNS = ("Clean",) + ATTACK_COLUMNS + ("DamageNet", "AutoAttack", "A", "C", "V2", "R", "Sketch", "Stylized")


@dataclass
class Row:
    item: str
    state: str          # present | missing | skipped | warning
    detail: str = ""


@dataclass
class Preflight:
    rows: List[Row] = field(default_factory=list)
    #: what the run will actually use where it differs from the config (e.g. amp off without CUDA)
    effective: Dict[str, Any] = field(default_factory=dict)

    def add(self, item: str, state: str, detail: str = "") -> None:
        self.rows.append(Row(item, state, detail))

    @property
    def missing(self) -> List[Row]:
        return [r for r in self.rows if r.state == "missing"]

    def table(self) -> str:
        w = max([len(r.item) for r in self.rows] + [4])
        lines = [f"{'need':<{w}}  {'state':<8}  detail", f"{'-' * w}  {'-' * 8}  ------"]
        lines += [f"{r.item:<{w}}  {r.state:<8}  {r.detail}" for r in self.rows]
        n = len(self.missing)
        warn = sum(r.state == "warning" for r in self.rows)
        tail = f" ({warn} warning{'s' * (warn != 1)} above)" if warn else ""
        lines.append(f"preflight: {n} missing" if n else f"preflight: everything needed is present or reachable{tail}")
        return "\n".join(lines)

    def raise_if_missing(self) -> None:
        if self.missing:
            r = self.missing[0]
            more = f" (and {len(self.missing) - 1} more, see the table)" if len(self.missing) > 1 else ""
            raise NSPluginError(f"preflight: {r.item}: {r.detail}{more}")


def _count_classes(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _writable(out: Path) -> Optional[str]:
    """None when ``out`` can be created and written, else why not."""
    p = out
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        return f"{p} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=p, prefix=".ns_plugin_write_test"):
            pass
    except OSError as e:
        return f"{p} is not writable ({e.strerror or e})"
    return None


def _checkpoint_classes(path: Path, use_ema: bool) -> Optional[int]:
    """Class count of a checkpoint file, read lazily (mmap: no full load of a 300 MB file)."""
    import argparse

    import torch

    from ..models import num_classes_of
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 (not a zip checkpoint, or pickled objects: the full reader decides later)
        return None
    if not isinstance(ck, dict):
        return None
    keys = ("state_dict_ema", "model_ema") if use_ema else ("state_dict", "model")
    sd = next((ck[k] for k in keys if isinstance(ck.get(k), dict)), None if use_ema else ck)
    if sd is None:
        return None
    return num_classes_of({k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()})


def run_sources(cfg: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per run: its name, method and where its starting weights come from (the run's keys over the config's
    training block): ``model``, ``pretrained``, ``init``, ``init_ema``, ``num_classes``, ``vqgan``, ``amp``."""
    tr = cfg.get("training", {}) or {}
    out = []
    for run in cfg["runs"]:
        def get(k, d=None, run=run):
            return run.get(k, tr.get(k, d))
        out.append({"name": run["name"], "method": run.get("method"), "model": cfg["model"],
                    "pretrained": bool(get("pretrained", False)), "init": get("init"),
                    "init_ema": bool(get("init_ema", False)), "num_classes": get("num_classes"),
                    "vqgan": get("vqgan", "small"), "amp": bool(get("amp", False)),
                    "world_size": get("world_size")})
    return out


def preflight(cfg: Dict[str, Any], out: os.PathLike, *, network: bool = True) -> Preflight:
    """Check a validated comparison config (see the module docstring); no training, no downloads."""
    import torch

    from .. import weights as W
    from ..training.config import VQGAN_CONFIGS

    pf = Preflight()
    out = Path(out)
    why = _writable(out)
    pf.add(f"output folder {out}", "missing" if why else "present", why or "writable")

    digits = cfg["data"] == "digits"
    root = None if digits else Path(cfg["data"])
    sources = run_sources(cfg)
    trains = [s for s in sources if s["method"] is not None]

    # --- models and their weights
    model = cfg["model"]
    if model != "default":
        try:
            W.check_timm_name(model)
            pf.add(f"timm model {model}", "present", "known to timm")
            if digits:   # the digits' benchmark folders and attacked images are 32x32
                from timm.models import get_pretrained_cfg
                pc = get_pretrained_cfg(model)
                size = tuple(getattr(pc, "input_size", None) or ()) if pc is not None else ()
                if size and tuple(size[1:]) != (32, 32):
                    pf.add("digits at the model's input size", "missing",
                           f"the digits comparison is 32x32 but {model} takes {size[1]}x{size[2]}; use model: "
                           f"default, or an ImageNet-layout folder as data")
        except NSPluginError as e:
            pf.add(f"timm model {model}", "missing", str(e))
            model = None
    groups: Dict[Any, List[str]] = {}      # one row per resource, naming the runs that need it
    status: Dict[Any, Any] = {}
    for s in sources:
        k_model = None
        if s["init"]:
            key = ("init", s["init"], s["init_ema"])
            if key not in status:
                status[key] = W.init_status(s["init"], network=network)
            st = status[key]
            if st.state == "present":
                k_model = _checkpoint_classes(st.path, s["init_ema"])
        elif cfg["model"] == "default":
            key = ("default",)
            status[key] = None
            k_model = 10
        elif model is None:
            continue
        elif s["pretrained"]:
            key = ("pretrained", model)
            if key not in status:
                status[key] = W.pretrained_status(model, network=network)
            from timm.models import get_pretrained_cfg
            pc = get_pretrained_cfg(model)
            k_model = getattr(pc, "num_classes", None) if pc is not None else None
        else:
            key = ("random", model)
            status[key] = None
        groups.setdefault(key, []).append(s["name"])
        # an init checkpoint brings its own classifier; otherwise num_classes (a new head) or the weights' count
        s["model_classes"] = (k_model or s["num_classes"]) if s["init"] else (s["num_classes"] or k_model)
    for key, names in groups.items():
        runs = f" (runs {', '.join(map(repr, names))})"
        st = status[key]
        if key[0] == "init":
            src = key[1] if len(key[1]) <= 72 else key[1][:34] + "..." + key[1][-35:]
            pf.add(f"init {src}" + (" [EMA]" if key[2] else ""), st.state, st.detail + runs)
        elif key[0] == "pretrained":
            pf.add(f"pretrained weights of {key[1]}", st.state, st.detail + runs)
        elif key[0] == "default":
            pf.add("weights of the embedded tiny ViT", "present", "trained once and cached" + runs)
        else:
            pf.add(f"weights of {key[1]}", "warning", "random initialisation (pretrained: false, no init)" + runs)

    # --- data: training images and the folder of every column
    skip = set((cfg.get("eval") or {}).get("skip") or [])
    k_data = None
    if digits:
        pf.add("data", "present", "embedded digits (10 classes); benchmark folders are generated")
        k_data = 10
    else:
        if trains:
            tr_dir = root / "train"
            if tr_dir.is_dir() and _count_classes(tr_dir):
                k_data = _count_classes(tr_dir)
                pf.add(f"training images {tr_dir}", "present", f"{k_data} class folders "
                       f"(runs {', '.join(repr(s['name']) for s in trains)})")
            else:
                pf.add(f"training images {tr_dir}", "missing",
                       f"no class folders; the training runs need ImageNet-style {tr_dir}/<class>/<image>")
        for col, folder in COLUMN_FOLDERS.items():
            p = root / folder
            if col in skip:
                pf.add(f"column {col}", "skipped", "listed in eval.skip")
            elif p.is_dir() and any(True for _ in p.iterdir()):
                pf.add(f"column {col}", "present", str(p))
                if col == "Clean" and k_data is None:
                    k_data = _count_classes(p)
            else:
                pf.add(f"column {col}", "missing", f"no folder {p}; add it (EasyRobust's benchmarks/data layout) "
                                                   f"or list {col} under eval.skip")
    ev = cfg.get("eval") or {}
    clean_ok = digits or any(r.item == "column Clean" and r.state == "present" for r in pf.rows)
    for col in ATTACK_COLUMNS:
        if col in skip:
            pf.add(f"column {col}", "skipped", "listed in eval.skip")
        else:
            pf.add(f"column {col}", "present" if clean_ok else "missing",
                   "attacks the clean test images" + ("" if clean_ok else " (no imagenet-val folder)"))
    dn = ev.get("damagenet")
    if "DamageNet" in skip or not dn:
        pf.add("column DamageNet", "skipped", "listed in eval.skip" if "DamageNet" in skip else "eval.damagenet not set")
    elif Path(dn).is_dir():
        pf.add("column DamageNet", "present", str(dn))
    else:
        pf.add("column DamageNet", "missing", f"no folder {dn}; set eval.damagenet to the DamageNet images or list "
                                              f"DamageNet under eval.skip")
    if ev.get("autoattack"):
        try:
            from ..integrations import robustbench as rb
            source = rb.ensure_autoattack()
            import autoattack  # noqa: F401
            pf.add("column AutoAttack", "present", f"autoattack importable ({source})")
        except Exception as e:  # noqa: BLE001
            pf.add("column AutoAttack", "missing", f"cannot import autoattack ({type(e).__name__}: {e})")

    # --- class counts: every model must have the data's classes
    if k_data is not None:
        for s in sources:
            k = s.get("model_classes")
            if k is not None and k != k_data:
                fix = ("set num_classes to train a new classifier from the pretrained weights"
                       if s["pretrained"] and not s["init"] else "use a checkpoint trained on these classes")
                pf.add(f"classes of {s['name']!r}", "missing",
                       f"the model has {k} classes but the data has {k_data}; {fix}")

    # --- DAT's VQGAN
    vq_runs: Dict[str, List[str]] = {}
    for s in trains:
        if s["method"] in ("dat", "dat_ns"):
            vq_runs.setdefault(s["vqgan"], []).append(s["name"])
    for name, runs in vq_runs.items():
        spec = VQGAN_CONFIGS.get(name)
        label = f"VQGAN {name}"
        if spec is None:
            pf.add(label, "missing", f"unknown VQGAN (known: {', '.join(sorted(VQGAN_CONFIGS))})")
        elif not spec.get("url"):
            pf.add(label, "present", f"randomly initialised stand-in (runs {', '.join(map(repr, runs))})")
        else:
            p = W.torch_hub_checkpoints() / os.path.basename(spec["url"])
            if p.is_file():
                pf.add(label, "present", str(p))
            else:
                why = W.unreachable(spec["url"]) if network else None
                pf.add(label, "missing" if why else "reachable",
                       f"not in {p.parent} and {why}" if why else f"will download {spec['url']}")

    # --- devices
    cuda = torch.cuda.is_available()
    n_gpu = torch.cuda.device_count() if cuda else 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    pf.add("devices", "present", f"{n_gpu} CUDA GPU(s)" if cuda else "CPU only (no CUDA)")
    want = {s["world_size"] for s in sources if s["world_size"] is not None}
    for w in sorted(want):
        if w != world:
            pf.add("world_size", "missing", f"the config expects world_size {w} but this launch has {world} "
                                            f"process(es); use torchrun --nproc_per_node {w}")
    if cuda and local_world > n_gpu:
        pf.add("GPUs per node", "missing", f"{local_world} processes on this node but {n_gpu} GPU(s)")
    if any(s["amp"] for s in trains) and not cuda:
        pf.add("amp", "warning", "requested, but there is no CUDA: training runs in fp32 and config.json records amp: false")
        pf.effective["amp"] = False
    return pf
