"""Make an unchanged third-party program see ns_plugin's attacks and models: ``ns-plugin run -- CMD``.

Harnesses such as EasyRobust's ``benchmarks/benchmark.py``, torchattacks' ``code_coverage/test_atks.py`` or
a robustbench script never import ns_plugin, and neither timm 1.0.9 nor torchattacks 3.5.1 reads entry
points. ``ns-plugin run [--checkpoint NAME=PATH ...] -- python script.py ...`` starts the command with
``ns_plugin/_site`` first on ``PYTHONPATH``; its ``sitecustomize`` calls :func:`install_hooks`, which
registers

* our attacks into ``torchattacks`` (namespace and ``__all__``) right after the program imports torchattacks,
* the embedded architecture ``ns_vit_digits`` and each ``--checkpoint`` into timm's registry right after the
  program imports timm (so ``timm.create_model(NAME)``, EasyRobust's ``--model NAME`` and robustbench's
  ``load_model(NAME, dataset=...)`` find them),

without importing torch, timm or torchattacks in programs that do not use them. The checkpoints are read and
checked by the launcher before the command starts, so a bad path fails in one line (exit 2).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import NSPluginError

#: environment variable carrying the hook spec (JSON) to the launched program
ENV = "NS_PLUGIN_RUN"


def site_dir() -> str:
    """The folder holding the ``sitecustomize`` that ``ns-plugin run`` puts first on ``PYTHONPATH``."""
    return str(Path(__file__).resolve().parents[1] / "_site")


def make_spec(checkpoints: Sequence[Dict[str, object]] = (), *, attacks: bool = True, timm: bool = True) -> str:
    return json.dumps({"attacks": bool(attacks), "timm": bool(timm), "checkpoints": list(checkpoints)})


def launch_env(spec: str, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """``base`` (default ``os.environ``) with the hook spec set and ``ns_plugin/_site`` first on PYTHONPATH;
    the folder holding ns_plugin is added too, so the hook finds the same ns_plugin as the launcher."""
    env = dict(os.environ if base is None else base)
    pkg_parent = str(Path(__file__).resolve().parents[2])
    parts = [site_dir(), pkg_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    seen: List[str] = []
    for p in parts:
        if p not in seen:
            seen.append(p)
    env["PYTHONPATH"] = os.pathsep.join(seen)
    env[ENV] = spec
    return env


class _AfterExec(importlib.abc.Loader):
    """Runs the real loader, then ``callback(module)``."""

    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, get_source, ...
        return getattr(self._loader, name)


class PostImportHooks(importlib.abc.MetaPathFinder):
    """``{top-level module name: callback}``; each callback runs once, right after that module is first
    imported (immediately if it already is)."""

    def __init__(self, callbacks: Dict[str, Callable]):
        self.callbacks = dict(callbacks)
        self._busy: set = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.callbacks or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _AfterExec(spec.loader, self.callbacks.pop(fullname))
        return spec

    def install(self) -> "PostImportHooks":
        for name in [n for n in self.callbacks if n in sys.modules]:
            self.callbacks.pop(name)(sys.modules[name])
        if self.callbacks:
            sys.meta_path.insert(0, self)
        return self


def _register_checkpoints(checkpoints) -> None:
    from .timm import register_checkpoint
    for c in checkpoints:
        register_checkpoint(c["name"], c["path"], use_ema=bool(c.get("use_ema", False)),
                            robustbench=tuple(c.get("robustbench", ("imagenet",))))


def install_hooks(spec: str) -> Optional[PostImportHooks]:
    """Install the post-import hooks described by ``spec`` (JSON from :func:`make_spec`)."""
    d = json.loads(spec)
    callbacks: Dict[str, Callable] = {}
    if d.get("attacks", True):
        def on_torchattacks(_module):
            from . import register
            register(timm=False)
        callbacks["torchattacks"] = on_torchattacks
    if d.get("timm", True) or d.get("checkpoints"):
        def on_timm(_module):
            from . import register
            if d.get("timm", True):
                register(torchattacks=False, plugins=False)
            _register_checkpoints(d.get("checkpoints", ()))
        callbacks["timm"] = on_timm
    return PostImportHooks(callbacks).install() if callbacks else None


def parse_checkpoint_arg(text: str, *, use_ema: bool = False, robustbench: Sequence[str] = ("imagenet",)
                         ) -> Dict[str, object]:
    """``NAME=PATH`` -> a checkpoint record; the file is read and checked now."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise NSPluginError(f"--checkpoint expects NAME=PATH, got {text!r}")
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise NSPluginError(f"--checkpoint {name}: no file {path}")
    return {"name": name, "path": str(p), "use_ema": use_ema, "robustbench": list(robustbench)}


def check_checkpoints(checkpoints) -> List[str]:
    """Register the checkpoints in this process (reads and checks each file); returns the timm names."""
    from .timm import register_checkpoint
    names: List[str] = []
    for c in checkpoints:
        names += register_checkpoint(c["name"], c["path"], use_ema=bool(c["use_ema"]),
                                     robustbench=tuple(c["robustbench"]))
    return names
