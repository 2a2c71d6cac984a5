"""One declarative validation pass for everything a user hands in: training configs, comparison configs, CLI
flags and API hyper-parameters.

A *spec* maps each key to a :class:`Check`; :func:`validate` walks a mapping against it before any work starts
and returns the normalised values, or raises one :class:`~ns_plugin.errors.NSPluginError` naming the key, what
it got and what it accepts. New settings are added by adding a key to the spec (e.g.
``TRAIN_SPEC["init"] = Choice("default", "pretrained")`` next to the new ``TrainConfig`` field); the same
check then serves the YAML file, the ``--flag`` (:func:`argtype`) and the Python API.

Rules that hold for every check: booleans are real booleans (``"false"`` in quotes is refused, never truthy);
numbers are finite; integers are integers (``1.5`` is refused, ``2.0`` accepted as 2); YAML 1.1 reads ``1e-5``
as a string, so numeric strings are accepted for floats; paths are checked for existence, kind (file vs
folder) and writability; figure paths for a suffix matplotlib can write.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import difflib
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence

from .errors import NSPluginError

_MISSING = object()


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


class Check:
    """A rule for one value: ``check(value, where)`` returns the normalised value or raises NSPluginError."""

    #: what the check accepts, for messages ("an integer >= 1")
    what = "a value"

    def __init__(self, *, optional: bool = False):
        self.optional = optional

    def __call__(self, value: Any, where: str) -> Any:
        if value is None:
            if self.optional:
                return None
            raise NSPluginError(f"{where} must be {self.what}, got nothing (null)")
        return self.convert(value, where)

    def convert(self, value: Any, where: str) -> Any:  # pragma: no cover - overridden
        return value

    def fail(self, value: Any, where: str, why: str = "") -> None:
        tail = f" ({why})" if why else ""
        null = " or null" if self.optional else ""
        raise NSPluginError(f"{where} must be {self.what}{null}, got {_show(value)}{tail}")


def _range_text(lo, hi, lo_open, hi_open) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


class Number(Check):
    """A finite number, optionally in a range (``lo_open``/``hi_open``: exclusive ends)."""

    integer = False

    def __init__(self, lo=None, hi=None, *, lo_open=False, hi_open=False, optional=False):
        super().__init__(optional=optional)
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        rng = _range_text(lo, hi, lo_open, hi_open)
        self.what = ("an integer" if self.integer else "a finite number") + (f" {rng}" if rng else "")

    def convert(self, value, where):
        v = value
        if isinstance(v, bool):
            self.fail(value, where)
        if isinstance(v, str):
            try:
                v = int(v.strip()) if self.integer else float(v.strip())
            except ValueError:
                try:
                    v = float(v.strip())
                except ValueError:
                    self.fail(value, where)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            try:  # numpy / torch scalars
                import numbers
                if not isinstance(v, numbers.Real):
                    self.fail(value, where)
                v = float(v)
            except TypeError:
                self.fail(value, where)
        if not math.isfinite(v):
            self.fail(value, where)
        if self.integer:
            if float(v) != int(v):
                self.fail(value, where)
            v = int(v)
        else:
            v = float(v)
        lo, hi = self.lo, self.hi
        if (lo is not None and (v <= lo if self.lo_open else v < lo)) or \
                (hi is not None and (v >= hi if self.hi_open else v > hi)):
            self.fail(value, where, "out of range")
        return v


class Int(Number):
    """An integer (``2.0`` accepted as 2; ``1.5``, ``True`` and ``"abc"`` refused)."""
    integer = True


class Float(Number):
    """A finite float."""


class Bool(Check):
    """A real boolean. The strings true/false/yes/no/on/off/1/0 (a ``--flag`` value) are converted; any other
    value, including other strings and numbers, is refused: a quoted ``"false"`` never turns a feature on."""

    what = "true or false"
    _STR = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}

    def convert(self, value, where):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in self._STR:
            return self._STR[value.strip().lower()]
        self.fail(value, where)


class Str(Check):
    """A non-empty string, optionally one of ``choices``."""

    def __init__(self, *choices: str, optional: bool = False, nonempty: bool = True):
        super().__init__(optional=optional)
        self.choices, self.nonempty = choices, nonempty
        self.what = ("one of " + ", ".join(repr(c) for c in choices)) if choices else "a text string"

    def convert(self, value, where):
        if not isinstance(value, str) or (self.nonempty and not value.strip()):
            self.fail(value, where)
        if self.choices and value not in self.choices:
            close = difflib.get_close_matches(value, self.choices, n=1)
            self.fail(value, where, f"did you mean {close[0]!r}?" if close else "")
        return value


def Choice(*choices: str, optional: bool = False) -> Str:
    """One of the given strings."""
    return Str(*choices, optional=optional)


_CHECK_PATHS = contextvars.ContextVar("ns_plugin_check_paths", default=True)


@contextlib.contextmanager
def without_path_checks():
    """Inside the block, :class:`PathCheck` checks only that a path is a string (for validating a config
    written for another machine, e.g. one naming an ImageNet folder that only exists there)."""
    token = _CHECK_PATHS.set(False)
    try:
        yield
    finally:
        _CHECK_PATHS.reset(token)


class PathCheck(Check):
    """A file-system path of a given ``kind``:

    - ``"file"`` / ``"dir"``: must exist and be a file / a folder;
    - ``"out_file"``: may exist (as a file, not a folder); its nearest existing parent must be a writable folder;
    - ``"out_dir"``: may exist (as a folder, not a file); nearest existing ancestor writable;
    - ``"figure"``: an ``out_file`` whose suffix matplotlib can write.

    ``special`` names values that are not paths (e.g. ``"digits"`` for the embedded data set).
    """

    _WHAT = {"file": "an existing file", "dir": "an existing folder", "out_file": "a writable file path",
             "out_dir": "a writable folder path", "figure": "a writable figure path (.png, .pdf, .svg, ...)"}

    def __init__(self, kind: str, *, special: Sequence[str] = (), optional: bool = False):
        super().__init__(optional=optional)
        assert kind in self._WHAT, kind
        self.kind, self.special = kind, tuple(special)
        self.what = self._WHAT[kind] + (f" or {', '.join(repr(s) for s in special)}" if special else "")

    def convert(self, value, where):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip():
            self.fail(value, where)
        if value in self.special or not _CHECK_PATHS.get():
            return value
        check_path(value, self.kind, where)
        return value


def check_path(path: Any, kind: str, where: str = "path") -> Path:
    """The checks of :class:`PathCheck` for one path (one line on failure); returns it as a ``Path``."""
    p = Path(path)
    if kind == "file":
        if p.is_dir():
            raise NSPluginError(f"{where}: {p} is a folder, not a file")
        if not p.is_file():
            raise NSPluginError(f"{where}: file {p} does not exist")
        if not os.access(p, os.R_OK):
            raise NSPluginError(f"{where}: file {p} is not readable (permission denied)")
        return p
    if kind == "dir":
        if p.is_file():
            raise NSPluginError(f"{where}: {p} is a file, not a folder")
        if not p.is_dir():
            raise NSPluginError(f"{where}: folder {p} does not exist")
        return p
    # outputs
    if kind in ("out_file", "figure") and p.is_dir():
        raise NSPluginError(f"{where}: {p} is a folder; give a file name")
    if kind == "out_dir" and p.exists() and not p.is_dir():
        raise NSPluginError(f"{where}: {p} is a file; give a folder path")
    if kind == "figure":
        from .io import check_figure_suffix
        check_figure_suffix(p, what=where)
    anc = p if (kind == "out_dir" and p.is_dir()) else p.parent
    anc = anc.absolute()
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise NSPluginError(f"{where}: {p} cannot be created: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise NSPluginError(f"{where}: {p} cannot be written: {anc} is not writable (permission denied)")
    if kind in ("out_file", "figure") and p.exists() and not os.access(p, os.W_OK):
        raise NSPluginError(f"{where}: {p} exists and is not writable (permission denied)")
    return p


class ListOf(Check):
    """A list (or tuple) of items each passing ``item``; at least ``min_len`` long."""

    def __init__(self, item: Check, *, min_len: int = 0, length: Optional[int] = None, optional: bool = False):
        super().__init__(optional=optional)
        self.item, self.min_len, self.length = item, min_len, length
        n = f"{length} " if length is not None else ("a non-empty " if min_len else "a ")
        self.what = f"{n}list of {item.what}" if length is None else f"a list of {length} entries"

    def convert(self, value, where):
        if not isinstance(value, (list, tuple)):
            self.fail(value, where)
        if self.length is not None and len(value) != self.length:
            self.fail(value, where, f"it has {len(value)}")
        if len(value) < self.min_len:
            self.fail(value, where, "it is empty")
        return [self.item(v, f"{where}[{i}]") for i, v in enumerate(value)]


class OneOf(Check):
    """The first of several checks that accepts the value (e.g. ``"all"`` or a list of names)."""

    def __init__(self, *checks: Check, optional: bool = False):
        super().__init__(optional=optional)
        self.checks = checks
        self.what = " or ".join(c.what for c in checks)

    def convert(self, value, where):
        errors = []
        for c in self.checks:
            try:
                return c(value, where)
            except NSPluginError as e:
                errors.append((c, e))
        for c, e in errors:  # a list given where a list is accepted: say what is wrong inside it
            if isinstance(value, (list, tuple)) and isinstance(c, ListOf) or \
                    isinstance(value, Mapping) and isinstance(c, Mapping_):
                raise e
        self.fail(value, where)


class Mapping_(Check):
    """A nested mapping validated against ``spec`` (see :func:`validate`)."""

    def __init__(self, spec: Dict[str, Check], *, optional: bool = False, required: Iterable[str] = ()):
        super().__init__(optional=optional)
        self.spec, self.required = spec, tuple(required)
        self.what = "a mapping of keys (" + ", ".join(spec) + ")"

    def convert(self, value, where):
        if not isinstance(value, Mapping):
            raise NSPluginError(f"{where} must be a mapping of keys ({', '.join(self.spec)}), got {_show(value)}")
        return validate(value, self.spec, where, required=self.required)


class Custom(Check):
    """Any function ``f(value, where) -> value`` raising NSPluginError (for rules that need other code)."""

    def __init__(self, f: Callable[[Any, str], Any], what: str = "a valid value", *, optional: bool = False):
        super().__init__(optional=optional)
        self.f, self.what = f, what

    def convert(self, value, where):
        return self.f(value, where)


def unknown_keys(keys: Iterable[str], known: Iterable[str], where: str) -> None:
    """One line for the first key not in ``known``, with a did-you-mean hint."""
    known = sorted(known)
    for k in keys:
        if k not in known:
            close = difflib.get_close_matches(str(k), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise NSPluginError(f"unknown key {k!r} in {where}{hint} (known: {', '.join(known)})")


def validate(values: Mapping, spec: Dict[str, Check], where: str = "config", *,
             required: Iterable[str] = (), allow_unknown: bool = False,
             prefix: Optional[str] = None) -> Dict[str, Any]:
    """Check every key of ``values`` against ``spec``; return a new dict of normalised values.

    Unknown keys are refused (with a did-you-mean hint) unless ``allow_unknown``; ``required`` keys must
    be present. Keys of ``spec`` missing from ``values`` are simply absent from the result. Messages name a
    key as ``<prefix>.<key>`` (``prefix`` defaults to ``where``; ``""`` for top-level keys).
    """
    if prefix is None:
        prefix = "" if where in ("config", "") else where
    if not isinstance(values, Mapping):
        raise NSPluginError(f"{where} must be a mapping of keys, got {_show(values)}")
    if not allow_unknown:
        unknown_keys(values, spec, where)
    for k in required:
        if k not in values:
            raise NSPluginError(f"{where} needs the key {k!r}")
    out = {}
    for k, v in values.items():
        c = spec.get(k)
        name = (f"{prefix} {k}" if prefix.endswith(":") else f"{prefix}.{k}") if prefix else str(k)
        out[k] = c(v, name) if c is not None else v
    return out


def check_args(where: str, **args: Any) -> Dict[str, Any]:
    """Validate API arguments: ``check_args("PatchFool", steps=(steps, Int(1)), lr=(lr, Float(0, lo_open=True)))``
    returns the normalised values (or raises one line ``PatchFool: steps must be ...``)."""
    out = {}
    for name, (value, check) in args.items():
        out[name] = check(value, f"{where}: {name}")
    return out


def argtype(check: Check, flag: str = "value") -> Callable[[str], Any]:
    """An argparse ``type=`` built from a check, so a bad ``--flag`` fails at parse time, in one line."""
    def conv(s):
        if check.optional and isinstance(s, str) and s.strip().lower() in ("none", "null", ""):
            return None
        try:
            return check(s, "value")
        except NSPluginError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    conv.__name__ = flag.lstrip("-").replace("-", "_")
    return conv


# ----------------------------------------------------------------------------------------------------------
# classes of data vs model
# ----------------------------------------------------------------------------------------------------------
def dataset_classes(ds) -> Optional[list]:
    """The class names of an ImageFolder (also through ``Subset``), or None."""
    while ds is not None and not hasattr(ds, "classes") and hasattr(ds, "dataset"):
        ds = ds.dataset
    c = getattr(ds, "classes", None)
    return list(c) if c is not None else None


def match_classes(data_classes: Sequence[str], n_model: Optional[int], model_classes: Optional[Sequence[str]] = None,
                  *, where: str = "data", fix: str = "") -> Optional[list]:
    """Check that a folder's classes fit a model; returns the model index of each folder class (or None when
    the folder's own order is the model's).

    With the model's class names known (``model_classes``), every folder class must be one of them and is
    mapped by name (a folder holding only class ``7`` is scored as class 7, not 0). Without names, the class
    counts must be equal. One line otherwise, naming both sides and ``fix``."""
    data_classes = [str(c) for c in data_classes]
    tail = f"; {fix}" if fix else ""
    if model_classes:
        model_classes = [str(c) for c in model_classes]
        if n_model is not None and len(model_classes) != n_model:
            model_classes = None
    if model_classes:
        unknown = [c for c in data_classes if c not in model_classes]
        if unknown:
            shown = ", ".join(repr(c) for c in model_classes[:12]) + (" ..." if len(model_classes) > 12 else "")
            raise NSPluginError(f"{where} has class folder(s) {unknown[:5]} that are not classes of the model "
                                f"({shown}){tail}")
        idx = [model_classes.index(c) for c in data_classes]
        return None if idx == list(range(len(idx))) else idx
    if n_model is not None and len(data_classes) != n_model:
        k = len(data_classes)
        raise NSPluginError(f"{where} has {k} class{'es' if k != 1 else ''} but the model has {n_model} outputs{tail}")
    return None
