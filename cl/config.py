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
import math
import os
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic_core import to_jsonable_python
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from cl.errors import ConfigError
from cl.yamlio import parse_yaml_text, read_yaml, yaml_text
from cl.registry import BENCHMARKS, STRATEGIES, Registry, UnknownNameError

__all__ = ["ConfigError", "RunConfig", "load_run_config", "parse_run_config"]

# Seeds are bounded so every derived seed (``seed * 1_000_003 + c`` and the like) stays inside the
# 64-bit range that torch and numpy generators accept.
MAX_SEED = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="random seed (0 .. 2**32 - 1)")]

# A path-valued key: '~' is expanded, and a relative path in a YAML file is taken relative to that
# file (like ``base:``); on the command line, relative to the working directory.
PATH_KEY = "path_key"


def PathField(default: Any = ..., **kwargs: Any) -> Any:  # noqa: N802 - a Field factory
    """A ``Field`` whose value is a filesystem path (see :data:`PATH_KEY`)."""
    extra = {**kwargs.pop("json_schema_extra", {}), PATH_KEY: True}
    return Field(default, json_schema_extra=extra, **kwargs)


def is_path_field(field: Any) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get(PATH_KEY))


# Keys that cannot change a result: a run may be reused or resumed with other values, and --set on
# them does not rename the run. Paths (data roots, weights files) are identified by content instead:
# the data fingerprint and the weights checksum are part of a run's identity (cl.engine.rundir).
VOLATILE_KEYS = ("progress", "out_dir", "data_root", "cache_dir", "num_threads", "train.checkpoint", "train.keep_checkpoints", "loader", "loggers")
# Keys added after runs existed whose default reproduces what those runs did: at that default they
# are left out of a run's identity, so a run made before the key existed is still recognised (and
# reused or resumed) instead of refused as a different config. Any other value is part of it.
IDENTITY_DEFAULTS: dict[str, Any] = {
    "backbone.cache_dtype": "float32",
    "train.lr_schedule": "constant", "train.warmup_steps": 0, "train.lr_milestones": [], "train.lr_gamma": 0.1, "train.grad_clip_norm": None,
    "plugins": [], "train.label_smoothing": 0.0, "train.augment": None, "backbone.tome": None,
}
# backbone.freeze (what was frozen) became backbone.trainable (what trains); a run's identity still
# hashes the old key and values, so runs made before the rename are recognised.
FREEZE_TO_TRAINABLE = {"frozen": "none", "bn_only": "batchnorm", "last_k": "last_blocks", "all": "all"}
# Keys that place a run directory rather than describe the run.
PLACEMENT_KEYS = ("experiment", "run_name", "seed")

# One directory level of a run directory: no separators, no '.'/'..', nothing hidden.
SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.,=+\-]{0,119}"


def check_folder_name(value: str, levels: int = 1) -> str:
    """``value`` if it is 1..``levels`` safe folder names joined by '/', else ValueError saying why."""
    parts = value.split("/")
    if len(parts) > levels or not all(re.fullmatch(SEGMENT, p) for p in parts):
        nesting = f" ('/' between at most {levels} levels)" if levels > 1 else " (no '/')"
        raise ValueError(
            f"{value!r} is not a safe folder name: letters, digits and _ . , = + - only, not starting with "
            f"'.', '-' or ','{nesting}, at most 120 characters per level"
        )
    return value


class Model(BaseModel):
    """Base for every config section: unknown keys are errors, types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, allow_inf_nan=False)


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

    def load(self, data_root: Path, hint: dict[str, Any] | None = None) -> Any:
        """The dataset as a :class:`cl.data.sources.SourceData`. ``hint``: a hub backbone's pretrained
        config (input size, interpolation, crop), which sources of image files decode with."""
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


class ValidationConfig(Model):
    """A class-stratified validation split carved from each experience's training data (never test)."""

    fraction: float | None = Field(None, gt=0, lt=1, description="share of each class's training samples")
    per_class: int | None = Field(None, ge=1, description="training samples per class moved to validation")
    seed: Seed = Field(0, description="seed of the split (independent of the run seed: every seed sees the same split)")

    @model_validator(mode="after")
    def _one(self) -> ValidationConfig:
        if (self.fraction is None) == (self.per_class is None):
            raise ValueError("give exactly one of 'fraction' and 'per_class'")
        return self


class BenchmarkConfig(Model):
    dataset: Annotated[DatasetConfig, Polymorphic(BENCHMARKS)]
    scenario: Literal["class_incremental", "task_incremental", "online", "domain_incremental"] = Field(
        "class_incremental", description="domain_incremental: one domain per experience, every class in each (multi-domain datasets)")
    n_experiences: int = Field(5, ge=1, description="number of experiences, base session included")
    base_classes: int | None = Field(
        None, ge=1, description="classes in the first experience (e.g. 4 for 'B4 Inc2'); null = equal split"
    )
    class_order: list[int] | None = Field(None, description="explicit class order (a permutation)")
    class_order_seed: Seed | None = Field(None, description="seed for a random class order; null = run seed")
    train_per_class: int | None = Field(None, ge=1, description="keep at most this many train samples per class")
    test_per_class: int | None = Field(None, ge=1, description="keep at most this many test samples per class")
    subsample_seed: Seed = Field(0, description="seed of the per-class subsampling")
    image_size: int | None = Field(None, ge=1, description="resize inputs to this size (null = native)")
    channels: Literal[1, 3] | None = Field(None, description="convert inputs to this many channels")
    online: OnlineConfig = Field(default_factory=OnlineConfig)
    validation: ValidationConfig | None = Field(
        None, description="hold out part of each experience's training data: evaluated after every experience, used by cl tune"
    )


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
    seed: Seed = 0

    @model_validator(mode="after")
    def _source(self) -> PretrainConfig:
        if self.train_on == "benchmark" and self.benchmark is None:
            raise ValueError("'benchmark' is required when train_on is 'benchmark'")
        if self.train_on == "base_session" and self.benchmark is not None:
            raise ValueError("'benchmark' is only used when train_on is 'benchmark'")
        return self


class WeightsConfig(Model):
    source: Literal["none", "hub", "file", "pretrain"] = "none"
    path: str | None = PathField(None, description="local .safetensors/.pth/.pt file when source is 'file'")
    sha256: str | None = Field(None, description="expected sha256 of the file; checked when given")
    pretrain: PretrainConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> WeightsConfig:
        if self.source == "file" and not self.path:
            raise ValueError("'path' is required when source is 'file'")
        if self.source != "file" and self.path:
            raise ValueError(f"'path' is only used when source is 'file' (source is '{self.source}')")
        if self.source != "file" and self.sha256:
            raise ValueError(f"'sha256' is only checked when source is 'file' (source is '{self.source}')")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256):
            raise ValueError("'sha256' must be 64 hexadecimal digits")
        if self.source == "pretrain" and self.pretrain is None:
            self.pretrain = PretrainConfig()
        if self.source != "pretrain" and self.pretrain is not None:
            raise ValueError(f"'pretrain' is only used when source is 'pretrain' (source is '{self.source}'); set pretrain: null")
        return self


class CompensatorConfig(Model):
    """ToCom (Jie et al., ECCV 2024): a low-rank plug-in on q and v that compensates the gap between
    merging r_train and r_eval tokens per block (cl.models.tocom)."""

    path: str | None = PathField(
        None, description="a compensator file written by `cl tocom` for this backbone (checked by its weights sha256); null = train it (cached) on the pretraining data")
    r_max: int = Field(16, ge=1, description="largest r it covers: r_max chunks of `dim` channels, one per step of r (rank r_max*dim; official 16)")
    dim: int = Field(2, ge=1, description="channels per chunk (the official tocom_dim: rank 16*2 = 32)")
    epochs: int = Field(5, ge=1, description="self-distillation epochs on the pretraining data")
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (cosine to 0, no warm-up)")
    weight_decay: float = Field(0.05, ge=0)
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the rank channels while training")
    train_scale: float = Field(0.1, gt=0, description="the scale s the branches are trained with")
    loss: Literal["kl", "mse"] = Field(
        "kl", description="kl: soft KL (temperature) on the logits of a linear head fitted to the teacher's r=0 features; mse: on the pooled features")
    temperature: float = Field(1.0, gt=0)
    augment: bool = Field(True, description="random crop (pad 2) and horizontal flip of the distillation images")
    seed: Seed = 0


class TomeConfig(Model):
    """Token merging (ToMe) in every block of a ViT backbone, optionally with a ToCom compensator."""

    r_train: int = Field(0, ge=0, description="tokens merged per block when the backbone sees training data (features, observe)")
    r_eval: int = Field(0, ge=0, description="tokens merged per block in evaluation forwards")
    prop_attn: bool = Field(True, description="proportional attention: add log(token size) to the attention logits")
    scale: float = Field(
        0.1, ge=0, description="compensator scale s at evaluation (0 = off); choose it on validation data (benchmark.validation, cl tune), never test")
    compensator: CompensatorConfig | None = Field(None, description="ToCom: eval forwards add s * delta(r_train -> r_eval); null = ToMe alone")

    @model_validator(mode="after")
    def _covered(self) -> "TomeConfig":
        c = self.compensator
        if c is not None:
            for key in ("r_train", "r_eval"):
                if getattr(self, key) > c.r_max:
                    raise ValueError(f"'{key}' {getattr(self, key)} exceeds compensator.r_max {c.r_max}")
        return self


class BackboneConfig(Model):
    name: str = Field(description="any timm architecture name")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    trainable: Literal["none", "batchnorm", "last_blocks", "all"] = Field(
        "none", description="which backbone parameters train (the strategy's head always does): none = a frozen backbone"
    )
    trainable_blocks: int | None = Field(None, ge=1, description="k for trainable: last_blocks")
    cache_features: bool = Field(True, description="precompute features once when the backbone is frozen")
    cache_dtype: Literal["float32", "float16"] = Field(
        "float32", description="dtype of cached features (float16 halves the cache on disk; training sees them as float32)")
    normalize: Literal["auto", "dataset", "imagenet", "none"] = Field(
        "auto", description="input normalisation; auto = the weights' own stats for hub/file, else dataset"
    )
    tome: TomeConfig | None = Field(None, description="token merging (ToMe) and its compensator (ToCom); ViT backbones only; null = off")

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

    @model_validator(mode="before")
    @classmethod
    def _old_freeze_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "freeze" in data:  # "freeze: all" meant "train everything": renamed, not aliased
            hint = ", ".join(f"{old} -> {new}" for old, new in FREEZE_TO_TRAINABLE.items())
            raise ValueError(f"'freeze' is now 'trainable', which says what trains ({hint})")
        return data

    @model_validator(mode="after")
    def _blocks(self) -> BackboneConfig:
        if self.trainable == "last_blocks" and self.trainable_blocks is None:
            raise ValueError("'trainable_blocks' is required when trainable is 'last_blocks'")
        if self.trainable != "last_blocks" and self.trainable_blocks is not None:
            raise ValueError("'trainable_blocks' is only used when trainable is 'last_blocks'")
        return self

    @property
    def frozen(self) -> bool:
        return self.trainable == "none"


class AugmentConfig(Model):
    """Per-sample augmentation of training batches in the continual phase, on the backbone's input."""

    crop_padding: int = Field(4, ge=0, le=64, description="random translation: zero-pad (after normalisation) by this many pixels of the backbone's input, crop back")
    hflip: bool = Field(True, description="random horizontal flip with probability 1/2")

    @model_validator(mode="after")
    def _does_something(self) -> "AugmentConfig":
        if self.crop_padding == 0 and not self.hflip:
            raise ValueError("crop_padding 0 and hflip false augment nothing: remove train.augment")
        return self


class TrainConfig(Model):
    epochs: int = Field(1, ge=1, description="epochs per experience (must be 1 online)")
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    eval_future_tasks: bool = Field(
        True, description="also evaluate tasks not trained yet (needed for forward transfer)"
    )
    checkpoint: bool = Field(True, description="checkpoint after every experience (needed for --resume)")
    keep_checkpoints: Literal["all", "last", "none"] = Field(
        "all", description="once the run has finished: all = the last two checkpoints, last = the last one, none = delete them"
    )
    max_steps: int | None = Field(None, ge=1, description="cap on optimiser steps per experience (smoke runs); null = every batch of every epoch")
    lr_schedule: Literal["constant", "cosine", "step"] = Field(
        "constant", description="learning rate over each experience's optimiser steps: cosine to 0, or x lr_gamma at each of lr_milestones (epochs)"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 over the first steps of each experience")
    lr_milestones: list[int] = Field(default_factory=list, description="step schedule: epochs (0-based) at which the rate is multiplied by lr_gamma")
    lr_gamma: float = Field(0.1, gt=0, le=1, description="step schedule: the factor at each milestone")
    grad_clip_norm: float | None = Field(None, gt=0, description="clip the gradients' global L2 norm to this before each step; null = no clipping")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy target: 1 - ε on the label, ε spread over the classes the sample competes over")
    augment: AugmentConfig | None = Field(
        None, description="augment every training batch (images only: needs the backbone run on each batch, not cached features); null = off")

    def lr_factor(self, step: int, total: int, epoch: int) -> float:
        """Multiplier of the base learning rate at optimiser ``step`` (0-based) of ``total`` in an
        experience, during ``epoch``."""
        factor = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.lr_schedule == "cosine":
            factor *= 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
        elif self.lr_schedule == "step":
            factor *= self.lr_gamma ** sum(epoch >= m for m in self.lr_milestones)
        return factor

    @property
    def scheduled(self) -> bool:
        return self.lr_schedule != "constant" or self.warmup_steps > 0


class ShiftConfig(Model):
    enabled: bool = Field(False, description="save probe features after every experience (cl shift RUN_DIR)")
    per_class: int = Field(20, ge=1, description="test samples per class in each task's probe set")
    layers: list[int] | None = Field(None, description="forward_intermediates block indices (null = all)")
    bn_stats: bool = Field(True, description="also record BatchNorm running vs true input means")
    seed: Seed = 0


class WandbLoggerConfig(Model):
    project: str = Field("cl", min_length=1, description="W&B project")
    entity: str | None = Field(None, description="W&B team or user (online mode)")
    mode: Literal["offline", "online"] = Field("offline", description="offline: files in RUN_DIR/wandb/, uploaded later by `wandb sync`")


class MlflowLoggerConfig(Model):
    tracking_uri: str | None = Field(None, description="default: sqlite:///OUT_DIR/mlflow.db (one database for every run under out_dir)")
    experiment: str | None = Field(None, description="MLflow experiment name (default: the run's experiment)")


class LoggersConfig(Model):
    """Mirrors of log.jsonl in experiment trackers. They change what is displayed, never results (not part of a run's identity)."""

    tensorboard: bool = Field(False, description="TensorBoard event files in RUN_DIR/tensorboard/")
    wandb: WandbLoggerConfig | None = Field(None, description="Weights & Biases ({} = offline, project 'cl'); null = off")
    mlflow: MlflowLoggerConfig | None = Field(None, description="MLflow ({} = local sqlite store under out_dir); null = off")


class LoaderConfig(Model):
    """How images on disk reach the model. Changes speed and memory, never results (not part of a run's identity)."""

    stream: Literal["auto", "always", "never"] = Field(
        "auto", description="keep image files on disk and decode batches on demand; auto = when decoded they exceed max_in_memory_gb")
    max_in_memory_gb: float = Field(1.0, ge=0, description="auto streaming threshold (decoded uint8 pixels of both splits)")
    num_workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader worker processes decoding streamed images; auto = 0 on CPU, min(8, cores - 1) on a GPU")
    pin_memory: bool | Literal["auto"] = Field("auto", description="page-locked batches for faster host-to-GPU copies; auto = on CUDA")
    persistent_workers: bool = Field(True, description="keep workers alive between passes over a pool")
    prefetch_factor: int = Field(2, ge=1, description="batches each worker decodes ahead")

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be >= 0 or 'auto'")
        return value

    def options(self, device: str) -> Any:
        """The :class:`cl.data.disk.LoaderOptions` these settings mean on ``device``."""
        from cl.data.disk import LoaderOptions

        gpu = device in ("cuda", "mps")
        workers = self.num_workers if self.num_workers != "auto" else (min(8, max(1, (os.cpu_count() or 1) - 1)) if gpu else 0)
        pin = self.pin_memory if self.pin_memory != "auto" else device == "cuda"
        return LoaderOptions(workers, bool(pin), self.persistent_workers, self.prefetch_factor, self.stream, self.max_in_memory_gb)


class RunConfig(Model):
    experiment: str = Field("default", description="experiment folder below out_dir (up to 4 '/'-separated safe names)")
    run_name: str | None = Field(None, description="run folder name (one safe name); default: strategy name")
    seed: Seed = 0
    out_dir: str = Field("runs", min_length=1, description="root of all run directories ('~' expanded; relative to the working directory)")
    data_root: str | None = Field(None, description="default: $CL_DATA, else ~/.cache/cl/data")
    cache_dir: str | None = Field(None, description="default: $CL_CACHE, else ~/.cache/cl")
    device: Literal["cpu", "cuda", "mps", "auto"] = Field("cpu", description="auto = cuda, else mps, else cpu")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16/fp16 = the backbone (and its PEFT modules) under autocast, heads and losses in fp32; fp16 scales the loss (GradScaler)"
    )
    smoke: bool = Field(False, description="a smoke rehearsal (cl run --smoke): a few samples and steps, not a measurement")
    num_threads: int | None = Field(None, ge=1)
    progress: bool = True
    plugins: list[str] = Field(
        default_factory=list, description="modules or .py files (relative to this YAML) registering strategies, datasets or PEFT methods; cl run --import adds one"
    )
    benchmark: BenchmarkConfig
    backbone: BackboneConfig
    strategy: Annotated[StrategyConfig, Polymorphic(STRATEGIES)]
    train: TrainConfig = Field(default_factory=TrainConfig)
    shift: ShiftConfig = Field(default_factory=ShiftConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    loggers: LoggersConfig = Field(default_factory=LoggersConfig)

    @property
    def name(self) -> str:
        return self.run_name or self.strategy.name

    @field_validator("out_dir", "data_root", "cache_dir")
    @classmethod
    def _expand_user(cls, value: str | None) -> str | None:
        return None if value is None else os.path.expanduser(value)

    @model_validator(mode="after")
    def _smoke_only_from_the_flag(self) -> "RunConfig":
        # a smoke run reads fake data and takes two steps: it must never land among real results
        if self.smoke and Path(self.out_dir).name != "smoke":
            raise ValueError("smoke: true is set by --smoke (which runs into OUT/smoke), not by hand")
        return self

    @field_validator("plugins")
    @classmethod
    def _plugins_imported(cls, value: list[str]) -> list[str]:
        from cl.plugins import import_plugins

        if any(not spec for spec in value):
            raise ValueError("an empty plugin name")
        import_plugins(value)  # already done before validation (parse_run_config); a no-op here
        return value

    @field_validator("experiment")
    @classmethod
    def _safe_experiment(cls, value: str) -> str:
        return check_folder_name(value, levels=4)

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if re.fullmatch(r"seed\d+", value):
            raise ValueError(f"'{value}' looks like a seed folder; choose another run name")
        return check_folder_name(value)

    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.experiment / self.name / f"seed{self.seed}"

    def resolved_data_root(self) -> Path:
        return Path(os.path.expanduser(self.data_root or os.environ.get("CL_DATA") or Path.home() / ".cache" / "cl" / "data"))

    def resolved_cache_dir(self) -> Path:
        return Path(os.path.expanduser(self.cache_dir or os.environ.get("CL_CACHE") or Path.home() / ".cache" / "cl"))


# --------------------------------------------------------------------------------------------
# YAML loading
# --------------------------------------------------------------------------------------------


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and empty mappings are leaves."""
    if not isinstance(data, dict) or (prefix and not data):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, everything else (lists included) is replaced.

    Changing a section's ``name`` (a strategy, a dataset, a backbone architecture) keeps its other
    keys: nothing is reset behind the user's back. Keys that the newly named entry does not accept
    are then rejected by validation, with one line naming them.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _absolute(value: str, base_dir: Path) -> str:
    expanded = os.path.expanduser(value)
    return expanded if not expanded or os.path.isabs(expanded) else os.path.abspath(os.path.join(base_dir, expanded))


def _section_models(field: Any, value: Any) -> list[type[BaseModel]]:
    """Config classes a raw section may be validated by (every registered one if its name is not given)."""
    poly = next((m for m in field.metadata if isinstance(m, Polymorphic)), None)
    if poly is None:
        target = _model_type(field.annotation)
        return [target] if target is not None else []
    name = value.get("name") if isinstance(value, dict) else None
    names = [name] if isinstance(name, str) and name in poly.registry else poly.registry.names()
    models = []
    for n in names:
        entry = poly.registry.entry(n)
        model = entry.config or entry.builder
        if isinstance(model, type) and issubclass(model, BaseModel):
            models.append(model)
    return models


def resolve_paths(raw: Any, base_dir: Path, model: type[BaseModel] | None = None) -> Any:
    """Copy of a raw run-config dict with path-valued keys ('~' expanded) made absolute against ``base_dir``.

    Path keys are the fields declared with :func:`PathField` (``backbone.weights.path``, a dataset's
    ``root``, ...), found by walking the dict along the config classes.
    """
    model = model or RunConfig
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    if model is RunConfig and isinstance(raw.get("plugins"), list):
        from cl.plugins import absolute_specs, import_plugins

        out["plugins"] = absolute_specs(raw["plugins"], base_dir)
        import_plugins(out["plugins"])  # so the sections below find a plugin's config classes
    for key, value in raw.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            continue
        if is_path_field(field):
            if isinstance(value, str):
                out[key] = _absolute(value, base_dir)
            continue
        for sub in _section_models(field, value):
            out[key] = resolve_paths(out[key], base_dir, sub)
    return out


MAX_BASE_FILES = 64


def load_yaml(path: str | Path, *, run_config: bool = True) -> dict[str, Any]:
    """Load a YAML file, resolving ``base:`` (a path relative to the file, or a list of them).

    Top-level keys starting with ``x-`` are dropped: they only hold YAML anchors (``x-opt: &opt ...``).
    Relative paths are made absolute against the directory of the file that wrote them, like
    ``base:`` itself: in a run config the path keys (see :func:`resolve_paths`); in a suite
    (``run_config=False``) its ``config:`` and the path keys of its overrides.
    """
    return _load_yaml(Path(path), (), {}, run_config)


def _load_yaml(path: Path, chain: tuple[Path, ...], loaded: dict[Path, dict[str, Any]], run_config: bool) -> dict[str, Any]:
    path = path.expanduser().resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise ConfigError(f"'base' inheritance cycle: {cycle}")
    if path in loaded:  # a diamond: each file is read once
        return loaded[path]
    if len(loaded) + len(chain) >= MAX_BASE_FILES:  # files read, and files waiting for their bases
        raise ConfigError(f"{path}: 'base' inheritance reaches more than {MAX_BASE_FILES} files")
    data = {k: v for k, v in read_yaml(path).items() if not k.startswith("x-")}
    data = resolve_paths(data, path.parent) if run_config else _resolve_suite_paths(data, path.parent)
    bases = data.pop("base", None)
    if bases is not None:
        if isinstance(bases, str):
            bases = [bases]
        if not isinstance(bases, list) or not bases or not all(isinstance(b, str) and b.strip() for b in bases):
            raise ConfigError(f"{path}: 'base' must be a path or a list of paths")
        merged: dict[str, Any] = {}
        for base in bases:
            merged = deep_merge(merged, _load_yaml(path.parent / os.path.expanduser(base), (*chain, path), loaded, run_config))
        data = deep_merge(merged, data)
    loaded[path] = data
    return data


def _resolve_suite_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """A suite's ``config:`` and the path keys of its overrides, made absolute against ``base_dir``."""
    out = dict(data)
    if isinstance(out.get("config"), str):
        out["config"] = _absolute(out["config"], base_dir)
    if isinstance(out.get("overrides"), dict):
        out["overrides"] = resolve_paths(out["overrides"], base_dir)
    for kind in ("benchmarks", "strategies"):
        if isinstance(out.get(kind), list):
            out[kind] = [
                {**e, "overrides": resolve_paths(e["overrides"], base_dir)} if isinstance(e, dict) and isinstance(e.get("overrides"), dict) else e
                for e in out[kind]
            ]
    return out


KEY_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML, as in a config file)."""
    key, sep, raw = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not key.strip() or any(not part for part in keys):
        raise ConfigError(f"--set expects key.path=value, got {text[:60]!r}")
    if len(keys) > 16 or not all(KEY_PART.fullmatch(k) for k in keys):
        raise ConfigError(f"--set {key[:60]!r}: a key path is up to 16 names of letters, digits, '_' and '-', joined by '.'")
    if not raw.strip():
        return keys, None
    try:
        value = parse_yaml_text(raw, f"--set {key}")
    except ConfigError:
        value = raw  # not YAML: the literal text (a string value)
    return keys, value


def nest(keys: list[str], value: Any) -> dict[str, Any]:
    """["a", "b"], v -> {"a": {"b": v}}."""
    out: Any = value
    for key in reversed(keys):
        out = {key: out}
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str], base_dir: Path | None = None) -> dict[str, Any]:
    """Apply ``--set key.path=value`` overrides in order; path keys are relative to ``base_dir`` (default: cwd)."""
    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        value = _dig(resolve_paths(nest(keys, value), base_dir or Path.cwd()), keys)
        node = out
        for i, key in enumerate(keys[:-1]):
            nxt = node.setdefault(key, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {text}: '{'.'.join(keys[: i + 1])}' is not a mapping")
            node = nxt
        node[keys[-1]] = value
    return out


def _dig(data: Any, keys: list[str]) -> Any:
    for key in keys:
        data = data[key]
    return data


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
            if sub is None and _unwrap(field.annotation)[1]:
                continue  # an optional polymorphic section switched off
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


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 4, 30, 30


def _describe(value: Any) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_validation_error(err: ValidationError, model: type[BaseModel], prefix: str = "", data: Any = None) -> str:
    """One line naming the offending key, what is allowed, and what was given.

    Unknown keys of one section are named together; when the section is a named entry (a strategy,
    a dataset, a PEFT method), the line says which entry rejects them, since a key that was valid for
    the entry it replaced (``--set strategy.name=...``) is kept and must be removed or changed.
    """
    errors = err.errors()
    first = errors[0]
    loc = tuple(first["loc"])

    def dotted(parts: tuple[Any, ...]) -> str:
        return ".".join(str(p) for p in (*([prefix] if prefix else []), *parts))

    key = dotted(loc)
    kind = first["type"]
    if kind == "extra_forbidden":
        same = [tuple(e["loc"]) for e in errors if e["type"] == "extra_forbidden" and tuple(e["loc"])[:-1] == loc[:-1]]
        rest = len(errors) - len(same)
        more = f" (and {rest} more error{'s' * (rest > 1)})" if rest else ""
        parent = _model_at(model, loc[:-1])
        allowed = ", ".join(sorted(parent.model_fields)) if parent else "?"
        section = data
        for part in loc[:-1]:
            section = section.get(part) if isinstance(section, dict) else (section[part] if isinstance(section, list) and isinstance(part, int) and part < len(section) else None)
        owner = f" for {dotted(loc[:-1]) or 'config'} '{section['name']}'" if isinstance(section, dict) and isinstance(section.get("name"), str) else ""
        names = ", ".join(f"'{dotted(l)}'" for l in same)
        return f"unknown key{'s' * (len(same) > 1)} {names}{owner} (allowed: {allowed}){more}"
    more = f" (and {len(errors) - 1} more error{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    if kind == "missing":
        return f"missing required key '{key}'{more}"
    msg = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    given = "" if kind.startswith("value_error") else f" (got {_describe(first.get('input'))})"
    where = f"'{key}'" if key else "config"
    return f"{where}: {msg}{given}{more}"


def _named_default(field: Any) -> NamedConfig | None:
    """A polymorphic field's default section, if it has one (an instance, or a factory's)."""
    default = field.default_factory() if field.default_factory is not None else field.default
    return default if isinstance(default, NamedConfig) else None


def _fill_defaults(model: type[BaseModel], raw: Any) -> Any:
    """``raw`` with each polymorphic section left at a default written out in full, and a section
    given without ``name`` completed from its default (``--set strategy.first_session.bottleneck=64``).
    So the resolved config records every value of a default section (its class, not the base's,
    serialises it), and an implicit default and the same section written out are one config."""
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    for fname, field in model.model_fields.items():
        poly = next((m for m in field.metadata if isinstance(m, Polymorphic)), None)
        default = _named_default(field) if poly is not None else None
        if default is not None and fname not in out:
            out[fname] = default.model_dump()
        elif default is not None and isinstance(out[fname], dict) and "name" not in out[fname]:
            out[fname] = deep_merge(default.model_dump(), out[fname])
        models = _section_models(field, out[fname]) if isinstance(out.get(fname), dict) else []
        if len(models) == 1:
            out[fname] = _fill_defaults(models[0], out[fname])
    return out


def parse_run_config(data: dict[str, Any]) -> RunConfig:
    """Validate a raw (already merged) dict into a RunConfig, or raise ConfigError."""
    from cl.plugins import import_plugins

    import_plugins(data.get("plugins"))  # before the strategy and dataset sections pick their classes
    data = _fill_defaults(RunConfig, data)
    model = _specialise(RunConfig, data)
    try:
        cfg = model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, data=data)) from None
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
    if bench.scenario == "domain_incremental":
        domains = getattr(bench.dataset, "num_domains", None)
        if domains is None:
            raise ConfigError(f"{prefix}.scenario: domain_incremental needs a multi-domain dataset (domainnet), not {bench.dataset.name}")
        if bench.n_experiences != domains():
            raise ConfigError(f"{prefix}.n_experiences: {bench.n_experiences}, but the stream has one experience per domain ({domains()})")
        for key in ("base_classes", "class_order"):
            if getattr(bench, key) is not None:
                raise ConfigError(f"{prefix}.{key}: not used in the domain-incremental scenario (every experience has every class); remove it")
        return [n] * domains()
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


def check_run_dir(cfg: RunConfig) -> Path:
    """The run directory, checked to lie inside ``out_dir`` once symlinks are followed."""
    run_dir = cfg.run_dir()
    root = Path(cfg.out_dir).resolve()
    if not run_dir.resolve().is_relative_to(root):
        raise ConfigError(f"run directory {run_dir} resolves to {run_dir.resolve()}, outside out_dir {root} (a symlink?)")
    return run_dir


def check_semantics(cfg: RunConfig) -> None:
    """Cross-section checks that pydantic field validators cannot see."""
    check_run_dir(cfg)
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
    from cl.registry import STRATEGIES

    train = cfg.train
    if (train.scheduled or train.grad_clip_norm is not None) and getattr(STRATEGIES.get(cfg.strategy.name), "trains_itself", False):
        raise ConfigError(f"train.lr_schedule / warmup_steps / grad_clip_norm: strategy {cfg.strategy.name} runs its own training loop and would ignore them")
    uses_cross_entropy = getattr(STRATEGIES.get(cfg.strategy.name), "uses_cross_entropy", lambda _: False)
    if train.label_smoothing > 0 and not uses_cross_entropy(cfg.strategy):
        raise ConfigError(f"train.label_smoothing: strategy {cfg.strategy.name} (as configured) trains no cross-entropy, so it would be ignored")
    if train.augment is not None:
        strategy_cls = STRATEGIES.get(cfg.strategy.name)
        if getattr(strategy_cls, "trains_itself", False):
            raise ConfigError(f"train.augment: strategy {cfg.strategy.name} runs its own training loop and would ignore it")
        wants_features = getattr(strategy_cls, "wants_features", lambda _: True)(cfg.strategy)
        if wants_features and cfg.backbone.frozen and cfg.backbone.cache_features:
            raise ConfigError("train.augment needs images, but this run trains on cached features (frozen backbone): "
                              "set backbone.cache_features: false to run the backbone on every augmented batch")
    tome = cfg.backbone.tome
    if tome is not None and getattr(getattr(cfg.strategy, "peft", None), "name", None) == "vpt":
        raise ConfigError("backbone.tome: token merging would merge VPT's prompt tokens with image tokens; not supported with peft 'vpt'")
    if tome is not None and cfg.shift.enabled and tome.r_train > 0:
        raise ConfigError("shift.enabled: per-layer probes need every patch token, set backbone.tome.r_train: 0")
    if train.lr_milestones and train.lr_schedule != "step":
        raise ConfigError("train.lr_milestones: only used by lr_schedule: step")
    if cfg.benchmark.scenario == "domain_incremental":
        if not getattr(STRATEGIES.get(cfg.strategy.name), "domain_incremental", False):
            raise ConfigError(f"strategy.name: {cfg.strategy.name} assumes new classes per experience and does not run domain-incremental streams")
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
    Path(path).write_text(yaml_text(config_to_dict(cfg)), encoding="utf-8")
