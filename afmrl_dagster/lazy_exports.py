"""Lazy re-exports for the library packages (PEP 562).

Each package's ``__init__`` names its public surface, submodule by submodule; a name is
imported from its submodule on first access. So ``from afmrl_dagster.encoders import
DualTowerHead`` works, while ``import afmrl_dagster.encoders`` loads no submodule (and no torch).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package``, whose ``exports`` maps
    each submodule to the public names it defines."""
    owner = {name: module for module, names in exports.items() for name in names}
    clashes = sorted(set(owner) & set(exports))
    if clashes:
        raise ValueError(f"{package}: public names {clashes} are also submodule names")

    def __getattr__(name: str) -> object:
        module = owner.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(owner) | set(vars(sys.modules[package])))

    return sorted(owner), __getattr__, __dir__
