"""YAML in and out: a strict, bounded loader and a dumper that round-trips through it.

* Keys must be strings, unique, and not YAML 1.1 booleans (``on:``, ``no:``).
* ``1e-3`` is a float (YAML 1.2), as researchers write learning rates.
* Nesting depth and the size of the document with every alias expanded are bounded, so hostile
  input ("billion laughs", 20k-deep nesting, recursive aliases) is a one-line error, not a hang.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from cl.errors import ConfigError

# Bounds that keep hostile YAML (alias "billion laughs", 20k-deep nesting) a one-line error instead
# of a hang or a RecursionError in later copying, hashing and error formatting.
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000
MAX_YAML_BYTES = 1_000_000

# YAML 1.2 floats: PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a string. Researchers write
# learning rates that way, so it is read as the float it means.
_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
              |[0-9][0-9_]*[eE][-+]?[0-9]+
              |\.[0-9_]+(?:[eE][-+]?[0-9]+)?)
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


# YAML 1.2 integers (PyYAML's 1.1 rules read ``010`` as octal 8 and ``1:30`` as 90).
_INT_12 = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with string keys only, no duplicate keys, YAML 1.2 floats and bounded size.

    ``1e-3`` is a float; duplicate, boolean-looking and non-string keys are errors; nesting is
    limited to :data:`MAX_YAML_DEPTH` levels and the document, with every alias expanded, to
    :data:`MAX_YAML_NODES` nodes.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"{mark.name}:{mark.line + 1}: YAML nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node


# Replace PyYAML 1.1's float rule by the 1.2 one (only on our loader: add_implicit_resolver copies the
# table on first use in a subclass).
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT_12, list("-+0123456789"))
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


class _StrictDumper(yaml.SafeDumper):
    """Dumps with the loader's resolvers, so a string such as '1e-3' is quoted and reads back as a string."""


_StrictDumper.yaml_implicit_resolvers = {k: list(v) for k, v in _StrictLoader.yaml_implicit_resolvers.items()}


def yaml_text(data: Any) -> str:
    """YAML that :func:`parse_yaml_text` reads back to exactly ``data`` (key order kept)."""
    return yaml.dump(data, Dumper=_StrictDumper, sort_keys=False, allow_unicode=True)


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the nodes of the document with every alias expanded (iteratively, memoised per node).

    Raises ConfigError for a recursive alias or a document that expands beyond the bounds.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    mark = root.start_mark
    while stack:
        node, done = stack.pop()
        key = id(node)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > MAX_YAML_NODES:
                raise ConfigError(f"{mark.name}: YAML document expands to more than {MAX_YAML_NODES} values (aliases included)")
            if depth[key] > MAX_YAML_DEPTH:
                raise ConfigError(f"{mark.name}: YAML nested deeper than {MAX_YAML_DEPTH} levels (aliases included)")
            continue
        if key in size:
            continue
        if key in on_path:
            where = node.start_mark
            raise ConfigError(f"{where.name}:{where.line + 1}: recursive YAML alias")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def _check_keys(loader: _StrictLoader, node: yaml.MappingNode, checked: set[int]) -> None:
    """String keys, no duplicates: in ``node`` and in every mapping it merges (``<<:``), which PyYAML
    folds in as raw nodes without constructing them."""
    if id(node) in checked:
        return
    checked.add(id(node))
    seen: set[str] = set()
    for key_node, value_node in node.value:
        mark = key_node.start_mark
        if key_node.tag == "tag:yaml.org,2002:merge":
            merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for sub in merged:
                if not isinstance(sub, yaml.MappingNode):
                    raise ConfigError(f"{mark.name}:{mark.line + 1}: '<<' merges mappings only")
                _check_keys(loader, sub, checked)
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError(f"{mark.name}:{mark.line + 1}: a key must be a plain name, not a {key_node.id}")
        key = loader.construct_object(key_node, deep=False)
        if isinstance(key, bool):  # YAML 1.1 reads on/off/yes/no keys as booleans
            raise ConfigError(f"{mark.name}:{mark.line + 1}: key '{key_node.value}' is read as a boolean by YAML; quote it")
        if not isinstance(key, str):
            raise ConfigError(f"{mark.name}:{mark.line + 1}: key {key_node.value!r} must be a string; quote it")
        if key in seen:
            raise ConfigError(f"{mark.name}:{mark.line + 1}: duplicate key '{key}'")
        seen.add(key)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    _check_keys(loader, node, set())
    return loader.construct_mapping(node, deep=deep)


def _construct_int(loader: _StrictLoader, node: yaml.ScalarNode) -> int:
    """YAML 1.2 integers: ``010`` is ten (not octal eight); ``0o10`` and ``0x10`` are explicit."""
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("+-")
    if text.startswith(("0x", "0X")):
        return sign * int(text[2:], 16)
    if text.startswith(("0o", "0O")):
        return sign * int(text[2:], 8)
    return sign * int(text, 10)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def parse_yaml_text(text: str, where: str) -> Any:
    """Parse YAML text with the strict loader; errors are ConfigError naming ``where``."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text):,} characters; a config is at most {MAX_YAML_BYTES:,}")
    loader = None
    try:
        loader = _StrictLoader(text)  # the reader rejects control characters here
        loader.name = where  # marks (line numbers in errors) name the file, not "<unicode string>"
        return loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{at}: YAML syntax error: {problem}") from None
    except RecursionError:  # pragma: no cover - bounded by MAX_YAML_DEPTH; kept as a last resort
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse one YAML file (no inheritance) into a dict, with errors as ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a config file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    data = parse_yaml_text(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data
