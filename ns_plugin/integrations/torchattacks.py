"""torchattacks integration: ns_plugin's attacks in the ``torchattacks`` namespace and ``torchattacks.__all__``
(torchattacks has no registry or plugin discovery: its names are explicit imports plus ``__all__``, and its
own test suite loops over ``__all__``), and third-party attacks declared under the ``ns_plugin.attacks``
entry-point group.
"""
from __future__ import annotations

from typing import List

from .._registry import attacks
from ..errors import NSPluginError
from . import _LOCK

#: entry-point group scanned by register() for third-party attacks (``Name = package.module:Class``)
ATTACK_PLUGIN_GROUP = "ns_plugin.attacks"


def _is_ours(obj, name: str) -> bool:
    return getattr(obj, "__module__", "").startswith("ns_plugin.") and getattr(obj, "__name__", None) == name


def register_attack(name: str, cls, *, in_all: bool = True) -> None:
    """Put attack class ``cls`` into the ``torchattacks`` namespace (and ``torchattacks.__all__`` when
    ``in_all``) and into :data:`attacks`. Idempotent; a name torchattacks already uses for something else is
    an :class:`NSPluginError`."""
    import torchattacks
    from torchattacks.attack import Attack

    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise NSPluginError(f"attack {name!r} must be a torchattacks.Attack subclass, got {cls!r}")
    with _LOCK:
        existing = getattr(torchattacks, name, None)
        if existing is not None and existing is not cls and not (_is_ours(existing, name) and _is_ours(cls, name)):
            raise NSPluginError(f"torchattacks already has {name!r} ({getattr(existing, '__module__', '?')}); "
                                f"register the attack under another name")
        old = attacks._items.get(name)
        if old is not None and old is not cls and not (_is_ours(old, name) and _is_ours(cls, name)):
            raise NSPluginError(f"attack {name!r} is already registered to {old!r}; choose another name")
        attacks._items[name] = cls
        first = (cls.__doc__ or "").strip().splitlines()
        attacks._docs[name] = first[0].strip() if first else ""
        setattr(torchattacks, name, cls)
        if in_all and name not in torchattacks.__all__:
            torchattacks.__all__.append(name)


def register_builtin_attacks() -> List[str]:
    from .. import attacks as pkg
    for name in pkg.ATTACKS:
        register_attack(name, getattr(pkg, name), in_all=name in pkg.MODEL_ONLY)
    return list(pkg.ATTACKS)


def _entry_points(group: str):
    from importlib.metadata import entry_points
    try:
        return list(entry_points(group=group))
    except TypeError:  # Python < 3.10 API
        return list(entry_points().get(group, []))


def load_attack_plugins(group: str = ATTACK_PLUGIN_GROUP) -> List[str]:
    """Register every attack declared by installed packages under the entry-point ``group``
    (``Name = package.module:Class``) into torchattacks; ns_plugin's own entries are skipped (already done)."""
    names = []
    for ep in _entry_points(group):
        if ep.value.startswith("ns_plugin."):
            continue
        try:
            cls = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken third-party plugin must not break register()
            raise NSPluginError(f"attack plugin {ep.name!r} ({ep.value}) failed to import: {e}") from None
        register_attack(ep.name, cls)
        names.append(ep.name)
    return names
