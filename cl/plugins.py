"""Plugins: strategies, datasets and PEFT methods that live outside this package.

Two ways in, both ending in the same registries (:mod:`cl.registry`):

* an installed package declares entry points in the groups ``cl.strategies``, ``cl.datasets`` and
  ``cl.peft`` (``name = "module"``); the registry imports the module the first time the name is used;
* a run config lists modules or ``.py`` files under ``plugins:`` (``cl run --import X`` appends to it);
  they are imported before the config is validated, in every process that validates it (sweep
  workers, SLURM jobs), and :func:`provenance` records each file's SHA-256 next to the run.

``cl list`` reads names and their one-line help from the entry points and the declaring modules'
source text, without importing them, so listing does not load torch.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

from cl.errors import ConfigError
from cl.registry import PluginError, Registry

_IMPORTED: dict[str, dict[str, str]] = {}  # spec -> {"plugin", "module", "file", "sha256"}


def is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def import_plugin(spec: str) -> dict[str, str]:
    """Import a module name or a ``.py`` file (an absolute path) once per process; its record."""
    if spec in _IMPORTED:
        return _IMPORTED[spec]
    if is_file_spec(spec):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"plugins: no such file: {spec}")
        if path.suffix != ".py":
            raise ConfigError(f"plugins: {spec} is not a .py file")
        path = path.resolve()  # a symlink and its target are one plugin
        name = "cl_plugin_" + re.sub(r"\W", "_", path.stem)
        other = sys.modules.get(name)
        if other is not None and Path(getattr(other, "__file__", "") or "").resolve() != path.resolve():
            raise ConfigError(f"plugins: {spec} and {other.__file__} are both plugin files named {path.name}; rename one")
        if other is None:
            module_spec = importlib.util.spec_from_file_location(name, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except (Exception, SystemExit) as err:  # SystemExit: a plugin calling sys.exit() at import
                del sys.modules[name]
                raise ConfigError(f"plugins: {spec} failed to import: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}") from err
        record = {"plugin": spec, "module": name, "file": str(path.resolve()), "sha256": _sha256(path)}
    else:
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", spec):
            raise ConfigError(f"plugins: '{spec}' is neither a module name nor a .py file")
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as err:
            if err.name is not None and spec.startswith(err.name):
                raise ConfigError(f"plugins: no module named '{spec}' (a local file needs its path, e.g. ./{spec}.py)") from None
            raise ConfigError(f"plugins: {spec} failed to import: {err}") from err
        except (Exception, SystemExit) as err:
            raise ConfigError(f"plugins: {spec} failed to import: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}") from err
        file = getattr(module, "__file__", None)
        record = {"plugin": spec, "module": spec, "file": str(file or ""), "sha256": _sha256(Path(file)) if file else ""}
    _IMPORTED[spec] = record
    return record


def absolute_specs(specs: list[str], base_dir: Path) -> list[str]:
    """Plugin specs as a config holds them: ``.py`` paths absolute against ``base_dir`` ('~' expanded)."""
    return [os.path.abspath(base_dir / os.path.expanduser(s)) if isinstance(s, str) and is_file_spec(s) else s for s in specs]


def import_plugins(specs: Any) -> list[dict[str, str]]:
    """Import every spec of a config's ``plugins`` list."""
    if specs is None:
        return []
    if not isinstance(specs, list) or not all(isinstance(s, str) and s.strip() for s in specs):
        raise ConfigError(f"plugins: expected a list of module names or .py files, got {specs!r:.80}")
    return [import_plugin(s) for s in specs]


def provenance(specs: list[str]) -> list[dict[str, str]]:
    """What each plugin of a run was: its file and that file's SHA-256 as it is now."""
    records = []
    for spec in specs:
        record = dict(import_plugin(spec))
        if record["file"]:
            record["sha256"] = _sha256(Path(record["file"]))
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# Listing without importing
# --------------------------------------------------------------------------------------------


def _source_file(module: str) -> Path | None:
    """The ``.py`` file of a dotted module name, found without importing the module or its parents."""
    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if len(parts) == 1:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    for location in spec.submodule_search_locations or []:
        base = Path(location, *parts[1:-1])
        for candidate in (base / f"{parts[-1]}.py", base / parts[-1] / "__init__.py"):
            if candidate.is_file():
                return candidate
    # a subpackage installed from another folder (cl.strategies lives in strategies/): ask for the
    # parent package itself, which imports it (cheap for cl.strategies, whose __init__ is empty)
    try:
        parent = importlib.util.find_spec(".".join(parts[:-1]))
    except (ImportError, ValueError):
        return None
    for location in (parent.submodule_search_locations or []) if parent else []:
        for candidate in (Path(location) / f"{parts[-1]}.py", Path(location) / parts[-1] / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _helps_in(source: str) -> dict[str, str]:
    """``name -> help`` of every ``X.register("name", help=...)`` decorator in a module's source."""
    out: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            continue
        for deco in node.decorator_list:
            if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr == "register"):
                continue
            if not (deco.args and isinstance(deco.args[0], ast.Constant) and isinstance(deco.args[0].value, str)):
                continue
            given = next((k.value for k in deco.keywords if k.arg == "help"), None)
            if isinstance(given, ast.Constant) and isinstance(given.value, str) and given.value:
                out[deco.args[0].value] = given.value
            else:
                out[deco.args[0].value] = (ast.get_docstring(node) or "").strip().split("\n")[0]
    return out


def listing(registry: Registry[Any]) -> list[tuple[str, str]]:
    """(name, one-line help) of every name of a family, imported or only declared, importing nothing."""
    rows = {name: entry.help for name, entry in registry._entries.items()}
    helps: dict[str, dict[str, str]] = {}
    for name, decl in registry.declared().items():
        if name in rows:
            continue
        if decl.module not in helps:
            file = _source_file(decl.module)
            try:
                helps[decl.module] = _helps_in(file.read_text(encoding="utf-8")) if file else {}
            except (OSError, SyntaxError, UnicodeDecodeError):
                helps[decl.module] = {}
        rows[name] = helps[decl.module].get(name, "")
    return sorted(rows.items())


__all__ = ["PluginError", "import_plugin", "import_plugins", "is_file_spec", "listing", "provenance"]
