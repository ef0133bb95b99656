"""Name -> builder registries for each pluggable family (benchmarks, backbones, strategies, PEFT).

A family is a :class:`Registry`. Entries are added with its ``register`` decorator, next to the
code they build, and each entry may carry a typed config class so YAML for that entry is validated
by its own model. Unknown names raise an error that lists the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it verbatim.
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    builder: T
    config: type | None
    help: str


class Registry(Generic[T]):
    """A family of named builders.

    Args:
        family: human name of the family, used in error messages ("strategy", "benchmark").
        loader: optional callable that imports the modules whose decorators fill this registry.
            It runs on first lookup, so importing ``cl`` stays cheap.
    """

    def __init__(self, family: str, loader: Callable[[], None] | None = None) -> None:
        self.family = family
        self._entries: dict[str, Entry[T]] = {}
        self._loader = loader
        self._loaded = loader is None

    def register(self, name: str, *, config: type | None = None, help: str = "") -> Callable[[T], T]:
        """Decorator registering ``builder`` under ``name``."""

        def decorator(builder: T) -> T:
            if name in self._entries and self._entries[name].builder is not builder:
                raise ValueError(f"{self.family} '{name}' is registered twice")
            doc = help or (getattr(builder, "__doc__", None) or "").strip().split("\n")[0]
            self._entries[name] = Entry(name, builder, config, doc)
            return builder

        return decorator

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            assert self._loader is not None
            self._loader()

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._entries)

    def entry(self, name: str) -> Entry[T]:
        self._ensure_loaded()
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(self.names()) or "(none registered)"
            raise UnknownNameError(f"unknown {self.family} '{name}' (available: {valid})") from None

    def get(self, name: str) -> T:
        return self.entry(name).builder

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def describe(self) -> list[tuple[str, str]]:
        """(name, one-line help) for ``cl list``."""
        return [(n, self._entries[n].help) for n in self.names()]


def _load_strategies() -> None:
    import strategies  # noqa: F401  (registers on import)


def _load_benchmarks() -> None:
    import cl.data.sources  # noqa: F401


def _load_peft() -> None:
    try:
        import cl.peft  # noqa: F401
    except ModuleNotFoundError as err:  # the PEFT library is optional until it exists
        if err.name != "cl.peft":
            raise


BENCHMARKS: Registry[Any] = Registry("benchmark", _load_benchmarks)
STRATEGIES: Registry[Any] = Registry("strategy", _load_strategies)
PEFT: Registry[Any] = Registry("peft method", _load_peft)


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
