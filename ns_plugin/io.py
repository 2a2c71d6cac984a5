"""File-system plumbing shared by every part of ns_plugin (one place for each concept):

- :func:`atomic_write` (and its text/figure forms): write a temporary file in the target folder, then rename
  it over the target, so an interrupted job never leaves a half-written file behind. Temp files are named
  ``.<name>.<random>.tmp``; a writer killed between the write and the rename leaves one, and
  :func:`remove_stale_temps` (run by :func:`claim_output`) removes it on the next run of that folder.
- :func:`claim_output`: an exclusive lock on a run's output folder, so two runs can never write into the
  same folder; a lock left by a killed process is taken over.
- :func:`read_yaml_mapping`: the one YAML config reader.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[str], None], *, suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)``, then rename ``tmp_path`` to ``path``; the temp file is removed on failure."""
    from .errors import NSPluginError
    path = Path(path)
    if path.is_dir():
        raise NSPluginError(f"cannot write {path}: it is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except FileExistsError:
        raise NSPluginError(f"cannot write {path}: a file stands where a folder of its path should be") from None
    except NotADirectoryError:
        raise NSPluginError(f"cannot write {path}: a file stands where a folder of its path should be") from None
    except PermissionError:
        raise NSPluginError(f"cannot write {path}: permission denied; choose a writable location") from None
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
    fmt = savefig_kw.pop("format", None) or (path.suffix.lstrip(".").lower() or "png")
    check_figure_suffix(path if path.suffix else path.with_suffix("." + fmt))
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kw))


def figure_formats() -> List[str]:
    """The file suffixes matplotlib can write here (``png``, ``pdf``, ``svg``...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    return sorted(FigureCanvasAgg(Figure()).get_supported_filetypes())


def check_figure_suffix(path: PathLike, what: str = "figure") -> Path:
    """Refuse (one line) a figure path whose suffix matplotlib cannot write, or that names a folder."""
    from .errors import NSPluginError
    path = Path(path)
    if path.is_dir():
        raise NSPluginError(f"{what} {path} is a folder; give a file name such as {path / 'figure.png'}")
    fmt = path.suffix.lstrip(".").lower()
    ok = figure_formats()
    if fmt not in ok:
        raise NSPluginError(f"{what} {path}: matplotlib cannot write {'.' + fmt if fmt else 'a file without a suffix'}; "
                            f"use one of .{', .'.join(ok)}")
    return path


# ----------------------------------------------------------------------------------------------------------
# output-folder ownership
# ----------------------------------------------------------------------------------------------------------
LOCK_NAME = ".ns_plugin.lock"
#: ``.<name>.<8 random chars>.tmp``: the temp files of :func:`atomic_write` (and ``checkpoint.atomic_save``).
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temps(folder: PathLike) -> List[Path]:
    """Delete the temp files a killed writer left under ``folder`` (recursively); returns them.

    Only call this while holding the folder (:func:`claim_output` does): a live writer's temp file would
    otherwise be removed under it."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.rglob(".*.tmp"):
        if p.is_file() and _TEMP_RE.match(p.name):
            try:
                p.unlink()
                removed.append(p)
            except OSError:  # pragma: no cover - vanished or not ours
                pass
    if removed:
        log.info("removed %d stale temp file(s) left by an interrupted writer in %s", len(removed), folder)
    return removed


def lock_holder(folder: PathLike) -> Optional[dict]:
    """What the lock file of ``folder`` says (``pid``, ``host``, ``what``, ``since``), or None."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text() or "null")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def claim_output(folder: PathLike, *, what: str = "run", enabled: bool = True) -> Iterator[Path]:
    """Own the output folder ``folder`` for the duration of the ``with`` block::

        with claim_output(out, what="train"):
            ...   # nobody else can write into `out` now

    - The folder is created if needed; an existing *file* at that path, or an unwritable location, is one
      :class:`NSPluginError`.
    - The lock is an ``flock`` on ``folder/.ns_plugin.lock`` (which records PID, host, ``what`` and the start
      time). A second writer fails at once with one line naming the holder's PID. The kernel drops the
      lock when its process dies (even by SIGKILL), so a stale lock file of a killed run is simply taken over.
    - Temp files a killed writer left behind are removed (:func:`remove_stale_temps`) when its stale lock
      file is found (a killed writer cannot remove it); a folder never locked before is not swept.
    - If the block raises and the folder was created by this call and holds nothing else, it is removed
      again: a run refused before doing any work leaves no empty folder behind.

    ``enabled=False`` makes it a no-op (e.g. on DDP ranks other than 0, which do not write).
    """
    if not enabled:
        yield folder
        return
    import fcntl
    from .errors import NSPluginError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NSPluginError(f"output folder {folder} is a file; choose a folder path for --out")
    created: List[Path] = []
    p = folder.absolute()
    while not p.exists():
        created.append(p)
        p = p.parent
    if not p.is_dir():
        raise NSPluginError(f"cannot create output folder {folder}: {p} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise NSPluginError(f"cannot create output folder {folder}: permission denied; choose a writable "
                            f"location") from None
    except OSError as e:
        raise NSPluginError(f"cannot create output folder {folder}: {e.strerror or e}") from None

    def _cleanup_created():
        for d in created:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break

    lock_path = folder / LOCK_NAME
    fd = None
    try:
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError:
                raise NSPluginError(f"output folder {folder} is not writable; choose another --out or fix its "
                                    f"permissions") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                fd = None
                h = {}
                for _ in range(20):  # the holder writes its PID just after taking the lock
                    h = lock_holder(folder) or {}
                    if h.get("pid"):
                        break
                    time.sleep(0.05)
                who = f"PID {h['pid']}" if h.get("pid") else "another process"
                if h.get("host") and h.get("host") != socket.gethostname():
                    who += f" on {h['host']}"
                since = f", since {h['since']}" if h.get("since") else ""
                raise NSPluginError(f"output folder {folder} is in use by {who} ({h.get('what', 'a run')}{since}); "
                                    f"wait for it to finish or choose another --out")
            # the file we locked must still be the one at lock_path (a releasing holder unlinks it)
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = None
        prev = lock_holder(folder)
        stale = bool(prev and prev.get("pid"))  # a holder that released cleanly removes its lock file
        if stale:
            log.info("taking over the stale lock of %s (PID %s, %s, no longer running)", folder, prev["pid"],
                     prev.get("what"))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        if stale:  # only a killed writer leaves temp files (and its lock file); never sweep a foreign folder
            remove_stale_temps(folder)
    except BaseException:
        if fd is not None:
            os.close(fd)
        _cleanup_created()
        raise
    failed = False
    try:
        yield folder
    except BaseException:
        failed = True
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)
        if failed:
            _cleanup_created()


def read_yaml_mapping(path: PathLike) -> dict:
    """The mapping in a YAML file, or one clear :class:`NSPluginError` (missing file, bad YAML, not a mapping)."""
    import yaml
    from .errors import NSPluginError
    p = Path(path)
    if p.is_dir():
        raise NSPluginError(f"config file {path} is a folder; pass the YAML file")
    if not p.is_file():
        raise NSPluginError(f"config file {path} does not exist")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise NSPluginError(f"config file {path} is not a text (UTF-8) file; pass the YAML file") from None
    except PermissionError:
        raise NSPluginError(f"config file {path} is not readable (permission denied)") from None
    except yaml.YAMLError as e:
        raise NSPluginError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise NSPluginError(f"config file {path} must hold a mapping of keys")
    return d
