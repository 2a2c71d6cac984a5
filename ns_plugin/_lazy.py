"""Lazy attributes for a package: names listed in a table load their module on first access (PEP 562), so
importing the package stays light. Bottom layer: imports nothing of ns_plugin."""
from importlib import import_module
from typing import Callable, Dict, Iterable, Tuple


def lazy_attributes(package: str, table: Dict[str, str], names: Iterable[str]) -> Tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for module ``package``: ``table`` maps a public name to the module defining
    it; ``names`` is what ``dir()`` lists. A loaded value is cached in the package's namespace."""
    listed = sorted(names)

    def __getattr__(name: str):
        mod = table.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(mod), name)
        setattr(import_module(package), name, value)
        return value

    def __dir__():
        return listed

    return __getattr__, __dir__
