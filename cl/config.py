"""Experiment configuration: strict typed models, YAML with ``base:`` inheritance, ``--set`` overrides.

Every section is a pydantic model that forbids unknown keys and does not coerce types, so a typo or
a string where a number belongs fails at load time with one line naming the key. Sections whose
shape depends on a registered name (``strategy``, ``benchmark.dataset``) are validated against the
config class that the named entry registered, so each strategy keeps its config next to its code.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic_core import to_jsonable_python
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from cl.errors import ConfigError
from cl.registry import BENCHMARKS, STRATEGIES, Registry, UnknownNameError

__all__ = ["ConfigError", "RunConfig", "load_run_config", "parse_run_config"]


class Model(BaseModel):
    """Base for every config section: unknown keys are errors, types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class Polymorphic:
    """``Annotated`` marker: the section's ``name`` picks its config class from ``registry``."""

    def __init__(self, registry: Registry[Any]) -> None:
        self.registry = registry


class NamedConfig(Model):
    """A section selected by ``name`` from a registry (a strategy, a dataset)."""

    name: str = Field(description="registered name")


class StrategyConfig(NamedConfig):
    """Base of every strategy's config; each strategy file subclasses it."""


class DatasetConfig(NamedConfig):
    """Base of every dataset source's config; each source subclasses it."""

    def num_classes(self) -> int:
        """Number of classes, known without loading the images (used to validate splits)."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


class OnlineConfig(Model):
    batch_size: int = Field(10, gt=0, description="stream mini-batch size (samples per observe call)")
    eval_every: int = Field(500, gt=0, description="stream samples between anytime evaluations")
    eval_test_per_class: int | None = Field(
        100, gt=0, description="test samples per seen class used for anytime evaluation (null = all)"
    )


class BenchmarkConfig(Model):
    dataset: Annotated[DatasetConfig, Polymorphic(BENCHMARKS)]
    scenario: Literal["class_incremental", "task_incremental", "online"] = "class_incremental"
    n_experiences: int = Field(5, ge=1, description="number of experiences, base session included")
    base_classes: int | None = Field(
        None, ge=1, description="classes in the first experience (e.g. 4 for 'B4 Inc2'); null = equal split"
    )
    class_order: list[int] | None = Field(None, description="explicit class order (a permutation)")
    class_order_seed: int | None = Field(None, description="seed for a random class order; null = run seed")
    train_per_class: int | None = Field(None, ge=1, description="keep at most this many train samples per class")
    test_per_class: int | None = Field(None, ge=1, description="keep at most this many test samples per class")
    subsample_seed: int = Field(0, description="seed of the per-class subsampling")
    image_size: int | None = Field(None, ge=1, description="resize inputs to this size (null = native)")
    channels: Literal[1, 3] | None = Field(None, description="convert inputs to this many channels")
    online: OnlineConfig = Field(default_factory=OnlineConfig)


class PretrainConfig(Model):
    train_on: Literal["base_session", "benchmark"] = Field(
        "base_session", description="train on the first experience's classes, or on a source benchmark"
    )
    benchmark: BenchmarkConfig | None = Field(None, description="source benchmark when train_on == 'benchmark'")
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: bool = Field(True, description="random crop (pad 2) and horizontal flip")
    seed: int = 0

    @model_validator(mode="after")
    def _source(self) -> PretrainConfig:
        if self.train_on == "benchmark" and self.benchmark is None:
            raise ValueError("'benchmark' is required when train_on is 'benchmark'")
        if self.train_on == "base_session" and self.benchmark is not None:
            raise ValueError("'benchmark' is only used when train_on is 'benchmark'")
        return self


class WeightsConfig(Model):
    source: Literal["none", "hub", "file", "pretrain"] = "none"
    path: str | None = Field(None, description="local .safetensors/.pth/.pt file when source is 'file'")
    sha256: str | None = Field(None, description="expected sha256 of the file; checked when given")
    pretrain: PretrainConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> WeightsConfig:
        if self.source == "file" and not self.path:
            raise ValueError("'path' is required when source is 'file'")
        if self.source != "file" and self.path:
            raise ValueError(f"'path' is only used when source is 'file' (source is '{self.source}')")
        if self.source == "pretrain" and self.pretrain is None:
            self.pretrain = PretrainConfig()
        if self.source != "pretrain" and self.pretrain is not None:
            raise ValueError(f"'pretrain' is only used when source is 'pretrain' (source is '{self.source}')")
        return self


class BackboneConfig(Model):
    name: str = Field(description="any timm architecture name")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    freeze: Literal["frozen", "bn_only", "last_k", "all"] = Field(
        "frozen", description="which backbone parameters train (the strategy's head always does)"
    )
    trainable_blocks: int | None = Field(None, ge=1, description="k for freeze: last_k")
    cache_features: bool = Field(True, description="precompute features once when the backbone is frozen")
    normalize: Literal["auto", "dataset", "imagenet", "none"] = Field(
        "auto", description="input normalisation; auto = the weights' own stats for hub/file, else dataset"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from cl.registry import BACKBONES

        try:
            BACKBONES.check(name)
        except UnknownNameError as err:
            raise ValueError(str(err)) from None
        return name

    @field_validator("kwargs")
    @classmethod
    def _no_reserved(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key in ("pretrained", "num_classes", "pretrained_cfg_overlay"):
            if key in kwargs:
                raise ValueError(f"'{key}' is set by the framework; use backbone.weights instead")
        return kwargs

    @model_validator(mode="after")
    def _blocks(self) -> BackboneConfig:
        if self.freeze == "last_k" and self.trainable_blocks is None:
            raise ValueError("'trainable_blocks' is required when freeze is 'last_k'")
        if self.freeze != "last_k" and self.trainable_blocks is not None:
            raise ValueError("'trainable_blocks' is only used when freeze is 'last_k'")
        return self


class TrainConfig(Model):
    epochs: int = Field(1, ge=1, description="epochs per experience (must be 1 online)")
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    eval_future_tasks: bool = Field(
        True, description="also evaluate tasks not trained yet (needed for forward transfer)"
    )
    checkpoint: bool = Field(True, description="checkpoint after every experience (needed for --resume)")


class ShiftConfig(Model):
    enabled: bool = Field(False, description="save probe features after every experience (cl shift RUN_DIR)")
    per_class: int = Field(20, ge=1, description="test samples per class in each task's probe set")
    layers: list[int] | None = Field(None, description="forward_intermediates block indices (null = all)")
    bn_stats: bool = Field(True, description="also record BatchNorm running vs true input means")
    seed: int = 0


class RunConfig(Model):
    experiment: str = Field("default", pattern=r"^[A-Za-z0-9_.\-/]+$")
    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+$", description="default: strategy name")
    seed: int = 0
    out_dir: str = "runs"
    data_root: str | None = Field(None, description="default: $CL_DATA, else ~/.cache/cl/data")
    cache_dir: str | None = Field(None, description="default: $CL_CACHE, else ~/.cache/cl")
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    num_threads: int | None = Field(None, ge=1)
    progress: bool = True
    benchmark: BenchmarkConfig
    backbone: BackboneConfig
    strategy: Annotated[StrategyConfig, Polymorphic(STRATEGIES)]
    train: TrainConfig = Field(default_factory=TrainConfig)
    shift: ShiftConfig = Field(default_factory=ShiftConfig)

    @property
    def name(self) -> str:
        return self.run_name or self.strategy.name

    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.experiment / self.name / f"seed{self.seed}"

    def resolved_data_root(self) -> Path:
        return Path(self.data_root or os.environ.get("CL_DATA") or Path.home() / ".cache" / "cl" / "data")

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir or os.environ.get("CL_CACHE") or Path.home() / ".cache" / "cl")


# --------------------------------------------------------------------------------------------
# YAML loading
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=deep)
        mark = key_node.start_mark
        if isinstance(key, bool):  # YAML 1.1 reads on/off/yes/no keys as booleans
            raise ConfigError(f"{mark.name}:{mark.line + 1}: key '{key_node.value}' is read as a boolean by YAML; quote it")
        if key in seen:
            raise ConfigError(f"{mark.name}:{mark.line + 1}: duplicate key '{key}'")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse one YAML file (no inheritance) into a dict, with errors as ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, everything else (lists included) is replaced.

    A mapping that names a different registered entry (its ``name`` changes, e.g. a strategy) is
    replaced whole: the old entry's options would be unknown keys for the new one.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        renamed = isinstance(value, dict) and "name" in value and isinstance(out.get(key), dict) and out[key].get("name") != value["name"]
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not renamed:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a YAML file, resolving ``base:`` (a path relative to the file, or a list of them).

    Top-level keys starting with ``x-`` are dropped: they only hold YAML anchors (``x-opt: &opt ...``).
    """
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise ConfigError(f"'base' inheritance cycle: {cycle}")
    data = {k: v for k, v in read_yaml(path).items() if not (isinstance(k, str) and k.startswith("x-"))}
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a path or a list of paths")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml(path.parent / base, (*_chain, path)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects key.path=value, got '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, key in enumerate(keys[:-1]):
            nxt = node.setdefault(key, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {text}: '{'.'.join(keys[: i + 1])}' is not a mapping")
            node = nxt
        if keys[-1] == "name" and node.get("name") not in (None, value):
            node.clear()  # switching to another entry: the old entry's options do not apply
        node[keys[-1]] = value
    return out


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, allows None) for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _model_type(annotation: Any) -> type[BaseModel] | None:
    inner, _ = _unwrap(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def _specialise(model: type[BaseModel], raw: Any, loc: tuple[str, ...] = ()) -> type[BaseModel]:
    """Return ``model`` with every polymorphic section retyped to the config class its name selects."""
    if not isinstance(raw, dict):
        return model
    overrides: dict[str, Any] = {}
    for fname, field in model.model_fields.items():
        if fname not in raw:
            continue
        sub = raw[fname]
        key = ".".join((*loc, fname))
        poly = next((m for m in field.metadata if isinstance(m, Polymorphic)), None)
        target = _model_type(field.annotation)
        if poly is not None:
            if not isinstance(sub, dict) or not isinstance(sub.get("name"), str):
                raise ConfigError(f"'{key}' must be a mapping with a 'name' key")
            try:
                entry = poly.registry.entry(sub["name"])
                target = entry.config or entry.builder  # a dataset's builder is its config class
            except UnknownNameError as err:
                raise ConfigError(f"{key}.name: {err}") from None
        if target is None:
            continue
        spec = _specialise(target, sub, (*loc, fname))
        if spec is not _model_type(field.annotation):
            _, optional = _unwrap(field.annotation)
            new_type = spec | None if optional else spec
            new_field = copy.copy(field)
            new_field.annotation = new_type  # create_model takes the type from the FieldInfo
            new_field.metadata = [m for m in field.metadata if not isinstance(m, Polymorphic)]
            overrides[fname] = (new_type, new_field)
    if not overrides:
        return model
    return create_model(model.__name__, __base__=model, **overrides)


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        sub = _model_type(current.model_fields[part].annotation) if part in current.model_fields else None
        if sub is None:
            return None
        current = sub
    return current


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_validation_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line naming the offending key, what is allowed, and what was given."""
    errors = err.errors()
    first = errors[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in (*([prefix] if prefix else []), *loc))
    more = f" (and {len(errors) - 1} more error{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    kind = first["type"]
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        allowed = ", ".join(sorted(parent.model_fields)) if parent else "?"
        return f"unknown key '{key}' (allowed: {allowed}){more}"
    if kind == "missing":
        return f"missing required key '{key}'{more}"
    msg = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    given = "" if kind.startswith("value_error") else f" (got {_describe(first.get('input'))})"
    where = f"'{key}'" if key else "config"
    return f"{where}: {msg}{given}{more}"


def parse_run_config(data: dict[str, Any]) -> RunConfig:
    """Validate a raw (already merged) dict into a RunConfig, or raise ConfigError."""
    model = _specialise(RunConfig, data)
    try:
        cfg = model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model)) from None
    check_semantics(cfg)
    return cfg  # type: ignore[return-value]


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (+ ``base:`` chain) + ``--set`` overrides -> validated RunConfig."""
    data = load_yaml(path)
    if "suite" in data:
        raise ConfigError(f"{path} is a suite, not a run config: run it with `cl sweep {path}`")
    data = apply_overrides(data, overrides or [])
    return parse_run_config(data)


def split_sizes(n_classes: int, n_experiences: int, base_classes: int | None) -> list[int]:
    """Number of classes per experience; raises ValueError naming the key for impossible splits."""
    if n_experiences > n_classes:
        raise ValueError(f"benchmark.n_experiences: {n_experiences} experiences for {n_classes} classes")
    if base_classes is None:
        if n_classes % n_experiences:
            divisors = [d for d in range(1, n_classes + 1) if n_classes % d == 0]
            raise ValueError(
                f"benchmark.n_experiences: {n_experiences} does not divide {n_classes} classes "
                f"(allowed: {', '.join(map(str, divisors))}, or set benchmark.base_classes)"
            )
        return [n_classes // n_experiences] * n_experiences
    if base_classes >= n_classes and n_experiences > 1:
        raise ValueError(f"benchmark.base_classes: {base_classes} leaves no classes for later experiences")
    if n_experiences == 1:
        if base_classes != n_classes:
            raise ValueError(f"benchmark.base_classes: must equal {n_classes} with a single experience")
        return [n_classes]
    rest = n_classes - base_classes
    if rest % (n_experiences - 1):
        raise ValueError(
            f"benchmark.n_experiences: the {rest} classes after the base session do not split evenly "
            f"into {n_experiences - 1} experiences"
        )
    return [base_classes] + [rest // (n_experiences - 1)] * (n_experiences - 1)


def check_benchmark(bench: BenchmarkConfig, prefix: str = "benchmark") -> list[int]:
    """Checks that need the dataset's class count; returns classes per experience."""
    n = bench.dataset.num_classes()
    try:
        sizes = split_sizes(n, bench.n_experiences, bench.base_classes)
    except ValueError as err:
        raise ConfigError(str(err).replace("benchmark.", f"{prefix}.", 1)) from None
    if bench.class_order is not None and sorted(bench.class_order) != list(range(n)):
        raise ConfigError(
            f"{prefix}.class_order: must be a permutation of 0..{n - 1} "
            f"(got {_describe(bench.class_order)})"
        )
    return sizes


def check_semantics(cfg: RunConfig) -> None:
    """Cross-section checks that pydantic field validators cannot see."""
    check_benchmark(cfg.benchmark)
    if cfg.benchmark.scenario == "online" and cfg.train.epochs != 1:
        raise ConfigError(f"train.epochs: must be 1 in the online scenario (single pass), got {cfg.train.epochs}")
    pretrain = cfg.backbone.weights.pretrain
    if pretrain is not None and pretrain.benchmark is not None:
        check_benchmark(pretrain.benchmark, "backbone.weights.pretrain.benchmark")
    if cfg.backbone.weights.source == "file":
        path = Path(cfg.backbone.weights.path or "")
        if not path.is_file():
            raise ConfigError(f"backbone.weights.path: file not found: {path}")
    check = getattr(cfg.strategy, "check", None)
    if check is not None:
        try:
            check(cfg)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def config_hash(payload: Any) -> str:
    """Stable short hash of a config (model or plain data) for cache keys."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=to_jsonable_python)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dump_yaml(cfg: BaseModel, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)
