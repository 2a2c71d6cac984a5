"""Resumable AutoAttack evaluation state (the ``autoattack.state`` module robustbench 1.1.1 imports).

``EvaluationState(attacks_to_run, path)`` records which points are still robust (``robust_flags``), the
clean accuracy and which attacks have finished; ``to_disk`` writes it as JSON (atomically: a temporary file
renamed over the old one) and ``EvaluationState.from_disk(path)`` reads it back. Written for this package;
the public names follow fra31/auto-attack's ``autoattack.state``.
"""
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterable, Optional, Set

import torch


class EvaluationState:
    """What an AutoAttack run has established so far; saved to ``path`` (when set) as it changes."""

    def __init__(self, attacks_to_run: Iterable[str], path: Optional[os.PathLike] = None,
                 run_attacks: Iterable[str] = (), robust_flags: Optional[torch.Tensor] = None,
                 clean_accuracy: float = float("nan"), min_save_interval: float = 60.0):
        self._attacks_to_run = frozenset(attacks_to_run)
        self.path = Path(path) if path is not None else None
        self._run_attacks: Set[str] = set(run_attacks)
        self._robust_flags = robust_flags
        self._clean_accuracy = float(clean_accuracy)
        self.min_save_interval = float(min_save_interval)
        self._last_saved = float("-inf")

    # -- persistence -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        flags = self._robust_flags
        return {"attacks_to_run": sorted(self._attacks_to_run), "run_attacks": sorted(self._run_attacks),
                "robust_flags": None if flags is None else flags.detach().cpu().bool().tolist(),
                "clean_accuracy": self._clean_accuracy, "path": None if self.path is None else str(self.path)}

    def to_disk(self, force: bool = False) -> None:
        """Write the state to ``path``; unless ``force``, at most once per ``min_save_interval`` seconds."""
        if self.path is None or (not force and time.monotonic() - self._last_saved < self.min_save_interval):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._last_saved = time.monotonic()

    @classmethod
    def from_disk(cls, path: os.PathLike) -> "EvaluationState":
        path = Path(path)
        with path.open() as f:
            d = json.load(f)
        if d.get("path") not in (None, str(path)):
            warnings.warn(f"the state file {path} was written for {d['path']}")
        flags = d.get("robust_flags")
        return cls(d["attacks_to_run"], path=path, run_attacks=d.get("run_attacks", ()),
                   robust_flags=None if flags is None else torch.tensor(flags, dtype=torch.bool),
                   clean_accuracy=d.get("clean_accuracy", float("nan")))

    # -- the fields ----------------------------------------------------------------------------------------
    @property
    def attacks_to_run(self) -> frozenset:
        return self._attacks_to_run

    @property
    def run_attacks(self) -> Set[str]:
        return set(self._run_attacks)

    def add_run_attack(self, attack: str) -> None:
        self._run_attacks.add(attack)
        self.to_disk(force=True)

    @property
    def robust_flags(self) -> Optional[torch.Tensor]:
        return self._robust_flags

    @robust_flags.setter
    def robust_flags(self, flags: torch.Tensor) -> None:
        self._robust_flags = flags
        self.to_disk(force=True)

    @property
    def clean_accuracy(self) -> float:
        return self._clean_accuracy

    @clean_accuracy.setter
    def clean_accuracy(self, value: float) -> None:
        self._clean_accuracy = float(value)
        self.to_disk(force=True)

    @property
    def robust_accuracy(self) -> float:
        if self._robust_flags is None:
            raise ValueError("no robust_flags yet: run the attack first")
        if self._attacks_to_run - self._run_attacks:
            warnings.warn("robust_accuracy read before every attack has run")
        return self._robust_flags.float().mean().item()
