"""Atomic file writes shared by every part of ns_plugin: write a temporary file in the target folder, then
rename it over the target, so an interrupted job never leaves a half-written file behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[str], None], *, suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)``, then rename ``tmp_path`` to ``path``; the temp file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_savefig(fig, path: PathLike, **savefig_kw) -> Path:
    """``fig.savefig`` to ``path`` atomically; the format follows the suffix (PNG when there is none)."""
    path = Path(path)
    fmt = savefig_kw.pop("format", None) or (path.suffix.lstrip(".") or "png")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kw), suffix="." + fmt)


def read_yaml_mapping(path: PathLike) -> dict:
    """The mapping in a YAML file, or one clear :class:`NSPluginError` (missing file, bad YAML, not a mapping)."""
    import yaml
    from .errors import NSPluginError
    p = Path(path)
    if not p.is_file():
        raise NSPluginError(f"config file {path} does not exist")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise NSPluginError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise NSPluginError(f"config file {path} must hold a mapping of keys")
    return d
