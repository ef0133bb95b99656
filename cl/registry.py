"""Name -> builder registries for each pluggable family (benchmarks, backbones, strategies, PEFT).

A family is a :class:`Registry`. Entries are added with its ``register`` decorator, next to the
code they build, and each entry may carry a typed config class so YAML for that entry is validated
by its own model. Unknown names raise an error that lists the valid ones.

Which module registers which name is data, not code: every name, the framework's own included, is
an entry point of the family's group (``cl.strategies``, ``cl.datasets``, ``cl.peft``; see
pyproject.toml), and a lookup imports only the module that declares the name. This module imports
nothing of the framework, so everything can import it; loading plugins from files
(``--import``) and listing names without importing them live in :mod:`cl.plugins`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it verbatim.
        return str(self.args[0])


class PluginError(Exception):
    """A declared entry point that cannot be used (its module fails to import or does not register it)."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    builder: T
    config: type | None
    help: str


@dataclass(frozen=True)
class Declared:
    """One entry point of a family's group: ``name`` is registered by importing ``module``."""

    name: str
    module: str
    distribution: str


def declared(group: str) -> dict[str, Declared]:
    """The entry points of ``group`` by name; two distributions declaring one name is an error."""
    from importlib.metadata import entry_points

    out: dict[str, Declared] = {}
    for ep in entry_points(group=group):
        dist = ep.dist.name if ep.dist is not None else "?"
        here = Declared(ep.name, ep.module, dist)
        seen = out.get(ep.name)
        if seen is not None and seen.module != here.module:
            raise PluginError(f"entry point '{ep.name}' of group {group} is declared twice: by {seen.distribution} "
                              f"({seen.module}) and by {dist} ({here.module}); uninstall one")
        out[ep.name] = here
    return out


class Registry(Generic[T]):
    """A family of named builders.

    Args:
        family: human name of the family, used in error messages ("strategy", "benchmark").
        group: entry-point group declaring this family's names; a lookup of a name that is not
            registered yet imports the module its entry point names. ``None``: only what is
            registered by code that was imported anyway (tests, ``--import``).
    """

    def __init__(self, family: str, group: str | None = None) -> None:
        self.family = family
        self.group = group
        self._entries: dict[str, Entry[T]] = {}
        self._declared: dict[str, Declared] | None = None
        self._imported: set[str] = set()

    def register(self, name: str, *, config: type | None = None, help: str = "") -> Callable[[T], T]:
        """Decorator registering ``builder`` under ``name``."""

        def decorator(builder: T) -> T:
            if name in self._entries and self._entries[name].builder is not builder:
                raise ValueError(f"{self.family} '{name}' is registered twice")
            decl = self.declared().get(name) if self.group else None
            module = getattr(builder, "__module__", None)
            if decl is not None and module != decl.module:  # a plugin must not stand in for a declared name
                raise ValueError(f"{self.family} '{name}' belongs to {decl.distribution} ({decl.module}); "
                                 f"{module} cannot register it again: choose another name")
            doc = help or (getattr(builder, "__doc__", None) or "").strip().split("\n")[0]
            self._entries[name] = Entry(name, builder, config, doc)
            return builder

        return decorator

    def declared(self) -> dict[str, Declared]:
        """Entry points of this family, read once per process (cheap: no module is imported)."""
        if self._declared is None:
            self._declared = declared(self.group) if self.group else {}
            if self.group and not self._declared:
                raise PluginError(f"no {self.family} is declared under the entry-point group {self.group}: the package "
                                  "is not installed (run `make setup`, or `pip install -e .` in the repository)")
        return self._declared

    def _load(self, name: str) -> None:
        """Import the module declaring ``name``, if there is one and it was not imported yet."""
        decl = self.declared().get(name)
        if decl is None or decl.module in self._imported:
            return
        self._imported.add(decl.module)
        try:
            importlib.import_module(decl.module)
        except Exception as err:  # a plugin's own bug (RuntimeError, SyntaxError, ...) is reported, not raised through
            raise PluginError(f"{self.family} '{name}' (entry point of {decl.distribution}) failed to import "
                              f"{decl.module}: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}") from err
        if name not in self._entries:
            raise PluginError(f"{self.family} '{name}' is declared by {decl.distribution} in module {decl.module}, "
                              f"which registers no {self.family} of that name")

    def names(self) -> list[str]:
        """Every name, each declaring module imported; a broken plugin's names are skipped with a
        warning (a lookup of exactly that name still raises)."""
        import warnings

        for name in self.declared():
            if name not in self._entries:
                try:
                    self._load(name)
                except PluginError as err:
                    warnings.warn(f"skipping {err}", stacklevel=2)
        return sorted(self._entries)

    def known(self) -> list[str]:
        """Registered and declared names, nothing imported (for messages)."""
        return sorted(set(self._entries) | set(self.declared()))

    def entry(self, name: str) -> Entry[T]:
        if name not in self._entries:
            self._load(name)
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(self.known()) or "(none registered)"
            raise UnknownNameError(f"unknown {self.family} '{name}' (available: {valid})") from None

    def get(self, name: str) -> T:
        return self.entry(name).builder

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name not in self._entries:
            self._load(name)
        return name in self._entries

    def describe(self) -> list[tuple[str, str]]:
        """(name, one-line help) for ``cl describe``; ``cl list`` reads help without importing (cl.plugins)."""
        return [(n, self._entries[n].help) for n in self.names()]


BENCHMARKS: Registry[Any] = Registry("benchmark", "cl.datasets")
STRATEGIES: Registry[Any] = Registry("strategy", "cl.strategies")
PEFT: Registry[Any] = Registry("peft method", "cl.peft")


class _TimmBackbones:
    """Backbones are every architecture timm knows; this adapter gives them the registry interface."""

    family = "backbone"

    def names(self) -> list[str]:
        import timm

        return timm.list_models()

    def __contains__(self, name: object) -> bool:
        import timm

        return isinstance(name, str) and timm.is_model(name)

    def check(self, name: str) -> None:
        if name not in self:
            import difflib

            import timm

            close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
            hint = f" (did you mean: {', '.join(close)}?)" if close else " (see `cl list backbones`)"
            raise UnknownNameError(f"unknown backbone '{name}'{hint}")

    def describe(self) -> list[tuple[str, str]]:
        return [(n, "") for n in self.names()]


BACKBONES = _TimmBackbones()
