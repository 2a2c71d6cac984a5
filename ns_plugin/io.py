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
