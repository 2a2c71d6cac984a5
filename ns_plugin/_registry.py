"""The registry type (name -> factory) and the plugin's registries: trainers and attacks.

Bottom layer: imports nothing of ns_plugin but :mod:`ns_plugin.errors`. Training methods fill
:data:`trainers` when :mod:`ns_plugin.training` is imported (as timm's model modules fill its registry);
:mod:`ns_plugin.integrations.torchattacks` fills :data:`attacks`.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Iterator, List, Optional, TypeVar

from .errors import NSPluginError

T = TypeVar("T")


class Registry:
    """A named mapping of names to factories with a decorator, listing, and "did you mean" lookups.

    >>> trainers = Registry("trainer")
    >>> @trainers.register("standard")
    ... class Standard: ...
    >>> trainers.get("standard") is Standard
    True
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable] = {}
        self._docs: Dict[str, str] = {}

    def register(self, name: Optional[str] = None, obj: Optional[Callable] = None, *, doc: str = ""):
        """Register ``obj`` under ``name`` (decorator when ``obj`` is omitted). Registering the same object
        twice under one name is a no-op; a different object under a taken name is an error."""
        def deco(o: T) -> T:
            key = name or getattr(o, "__name__", None)
            if not key:
                raise NSPluginError(f"{self.kind} registration needs a name")
            old = self._items.get(key)
            if old is not None and old is not o:
                raise NSPluginError(f"{self.kind} {key!r} is already registered to {old!r}; choose another name")
            self._items[key] = o
            first = (getattr(o, "__doc__", None) or "").strip().splitlines()
            self._docs[key] = doc or (first[0] if first else "")
            return o
        return deco(obj) if obj is not None else deco

    def get(self, name: str) -> Callable:
        """The factory registered as ``name``; an unknown name lists the known ones and the closest match."""
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), list(self._items), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(sorted(self._items)) or "none"
            raise NSPluginError(f"unknown {self.kind} {name!r}{hint} (known: {known})") from None

    def build(self, name: str, *args, **kwargs):
        """``get(name)(*args, **kwargs)``."""
        return self.get(name)(*args, **kwargs)

    def names(self) -> List[str]:
        return sorted(self._items)

    def describe(self) -> Dict[str, str]:
        """``{name: first line of its docstring}``."""
        return {k: self._docs[k] for k in self.names()}

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


#: The registries the plugin exposes.
trainers = Registry("trainer")
attacks = Registry("attack")
