"""Avalanche's own strategies, run on our streams, backbone and evaluation.

Lomonaco et al. "Avalanche: an End-to-End Library for Continual Learning", CVPR-W 2021.
https://arxiv.org/abs/2104.00405

``{name: avalanche, method: replay}`` builds ``avalanche.training.Replay`` (or Naive, ER_ACE, SCR,
LwF, EWC, GDumb) around the same inputs our strategies see (cached features of the frozen
backbone, or uint8 images through it), trains it with Avalanche's own loop on exactly the samples of
each experience, and answers ``predict`` with the Avalanche model, so the results land in the same
accuracy matrices and metrics.json. Offline, Avalanche trains on the whole experience
(``train_experience``); online, every stream mini-batch becomes a one-batch Avalanche experience,
which is what ``split_online_stream`` does.

Avalanche 0.6 quirks handled here:

* ``SupervisedTemplate`` calls ``model.train()`` every epoch, which would put a frozen BatchNorm
  backbone in training mode; :class:`InputEncoder` keeps frozen parts in eval mode.
* Its default evaluator prints to stdout; an ``EvaluationPlugin`` without loggers is used.
* SCR augments its inputs (identity by default) and classifies with an NCM over memory means that
  it updates with momentum 0.5 (``update_class_means_dict``) rather than recomputing; classes
  absent from the memory get a zero mean, not -inf. Both are kept: this measures Avalanche's SCR.
* On cached features, SCR and the other methods train a projection / linear head only; for SCR a
  trainable MLP "feature extractor" sits on the frozen features so that its NCM is not SimpleCIL.
* ``IncrementalClassifier`` masks inactive units with -1000 and grows per experience.
* GDumb replaces ``strategy.model`` with a fresh copy of the initial model every experience, so the
  wrapper reads the model back from the strategy after each ``train`` (predicting with the object
  it passed in would use a model trained on the first experience only).
* The replay plugin warns (DeprecationWarning) on every call, forcing an "always" filter; the
  warnings are recorded and dropped around ``train``.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from cl.data.benchmark import Experience, Split
from cl.data.disk import as_tensor
from cl.registry import STRATEGIES
from cl.strategies.base import OptimConfig, Strategy, StrategyContext, make_optimizer

Method = Literal["naive", "replay", "er_ace", "scr", "lwf", "ewc", "gdumb"]


class AvalancheConfig(OptimConfig):
    name: Literal["avalanche"] = "avalanche"
    method: Method = Field(description="which Avalanche strategy")
    memory_size: int = Field(200, ge=1, description="replay / er_ace / scr / gdumb buffer size (Avalanche's mem_size)")
    replay_batch_size: int | None = Field(None, ge=1, description="memory samples per step, Avalanche's batch_size_mem (null = train batch size)")
    buffer: Literal["class_balanced", "experience_balanced"] = Field(
        "class_balanced", description="replay offline: class-balanced like our ER, or Avalanche's own default (experience-balanced)",
    )
    lwf_alpha: float = Field(1.0, ge=0)
    lwf_temperature: float = Field(2.0, gt=0)
    ewc_lambda: float = Field(100.0, ge=0)
    ewc_mode: Literal["separate", "online"] = "separate"
    ewc_decay: float | None = Field(None, ge=0, le=1, description="decay factor for ewc_mode: online")
    scr_temperature: float = Field(0.1, gt=0)
    scr_hidden_dim: int = Field(256, ge=1, description="SCR: trainable extractor on frozen features")
    scr_projection_dim: int = Field(128, ge=1)


class InputEncoder(nn.Module):
    """Stored inputs -> backbone features: identity on cached features, transform + backbone on images."""

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.backbone = None if ctx.cached_features else ctx.backbone.model

    def train(self, mode: bool = True) -> InputEncoder:
        super().train(mode)
        if self.backbone is not None:
            self.ctx.backbone.set_train(mode)  # frozen parts stay in eval whatever Avalanche asks
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.backbone is None:
            return x.float()
        return self.backbone(self.ctx.backbone.transform(x, x.device))


def to_avalanche_experience(split: Split, index: int, task_id: int = 0) -> Any:
    """A DatasetExperience over exactly these samples (with the attributes Avalanche plugins read)."""
    from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience
    from avalanche.benchmarks.utils import DataAttribute
    from avalanche.benchmarks.utils.classification_dataset import TaskAwareSupervisedClassificationDataset

    n = len(split)
    dataset = TaskAwareSupervisedClassificationDataset(
        [torch.utils.data.TensorDataset(as_tensor(split.x), split.y)],
        data_attributes=[
            DataAttribute(split.y.tolist(), "targets"),
            DataAttribute([task_id] * n, "targets_task_labels", use_in_getitem=True),
        ],
    )
    from avalanche.benchmarks.scenarios.generic_scenario import EagerCLStream

    exp = DatasetExperience(dataset=dataset, current_experience=index)
    exp.origin_stream = EagerCLStream("train", [], set_stream_info=False)  # Avalanche groups experiences by stream name
    exp.current_experience = index
    exp.classes_in_this_experience = sorted(set(split.y.tolist()))
    exp.previous_classes, exp.classes_seen_so_far, exp.future_classes = [], [], []
    exp.task_labels = [task_id]
    return exp


@STRATEGIES.register("avalanche", config=AvalancheConfig, help="Avalanche's Naive/Replay/ER-ACE/SCR/LwF/EWC/GDumb in this loop")
class AvalancheBaseline(Strategy):
    trains_itself = True  # offline: Avalanche's loop trains on each whole experience
    resumable = False  # Avalanche keeps buffers, old models and Fisher matrices outside the model

    def __init__(self, cfg: AvalancheConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: AvalancheConfig = cfg
        self.online = ctx.scenario == "online"
        self.model = self._build_model().to(self.device)
        self.av: Any = None  # built on first use: the initial head size comes from the first experience
        self.mini_index = 0

    def _build_model(self) -> nn.Module:
        from avalanche.models import IncrementalClassifier, SCRModel

        encoder = InputEncoder(self.ctx)
        d = self.ctx.feature_dim
        if self.cfg.method == "scr":
            extractor = nn.Sequential(encoder, nn.Linear(d, self.cfg.scr_hidden_dim), nn.ReLU()) if self.ctx.cached_features else encoder
            width = self.cfg.scr_hidden_dim if self.ctx.cached_features else d
            projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, self.cfg.scr_projection_dim))
            return SCRModel(extractor, projection)
        return nn.Sequential(encoder, IncrementalClassifier(d, initial_out_features=2, masking=True))

    def _build_strategy(self, batch_size: int, epochs: int) -> Any:
        from avalanche.training import EWC, GDumb, LwF, Naive, SCR, ER_ACE
        from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
        from avalanche.training.storage_policy import ReservoirSamplingBuffer

        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        with warnings.catch_warnings(record=True):  # "No loggers specified": exactly what we want
            evaluator = EvaluationPlugin(loggers=[])
        common: dict[str, Any] = dict(
            model=self.model, optimizer=make_optimizer(params, cfg), train_mb_size=batch_size, train_epochs=epochs,
            eval_mb_size=self.ctx.train.eval_batch_size, device=self.device, evaluator=evaluator,
        )
        mem_batch = cfg.replay_batch_size or batch_size
        criterion = nn.CrossEntropyLoss()
        if cfg.method == "naive":
            return Naive(criterion=criterion, **common)
        if cfg.method == "replay":
            if self.online:  # Avalanche's recommended online buffer
                plugin = ReplayPlugin(cfg.memory_size, batch_size=batch_size, batch_size_mem=mem_batch, storage_policy=ReservoirSamplingBuffer(cfg.memory_size))
                return Naive(criterion=criterion, plugins=[plugin], **common)
            from avalanche.training.storage_policy import ClassBalancedBuffer, ExperienceBalancedBuffer

            buffer = (ClassBalancedBuffer if cfg.buffer == "class_balanced" else ExperienceBalancedBuffer)(cfg.memory_size, adaptive_size=True)
            plugin = ReplayPlugin(cfg.memory_size, batch_size=batch_size, batch_size_mem=mem_batch, storage_policy=buffer)
            return Naive(criterion=criterion, plugins=[plugin], **common)
        if cfg.method == "er_ace":
            return ER_ACE(criterion=criterion, mem_size=cfg.memory_size, batch_size_mem=mem_batch, **common)
        if cfg.method == "scr":
            return SCR(mem_size=cfg.memory_size, temperature=cfg.scr_temperature, batch_size_mem=mem_batch, **common)
        if cfg.method == "lwf":
            return LwF(criterion=criterion, alpha=cfg.lwf_alpha, temperature=cfg.lwf_temperature, **common)
        if cfg.method == "ewc":
            return EWC(criterion=criterion, ewc_lambda=cfg.ewc_lambda, mode=cfg.ewc_mode, decay_factor=cfg.ewc_decay, **common)
        return GDumb(criterion=criterion, mem_size=cfg.memory_size, **common)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def storage_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.trainable_parameters())

    def memory_stats(self) -> tuple[int, int]:
        """Samples in Avalanche's replay buffer (replay, er_ace, scr, gdumb), at our storage cost per sample."""
        if self.av is None:
            return 0, 0
        policy = getattr(self.av, "storage_policy", None)
        for plugin in getattr(self.av, "plugins", []):
            policy = getattr(plugin, "storage_policy", policy)
        buffer = getattr(policy, "buffer", None)
        n = len(buffer) if buffer is not None else 0
        per_sample = self.ctx.feature_dim * 4 if self.ctx.cached_features else 0
        return n, n * (per_sample + 16)

    def _train(self, split: Split, index: int, task_id: int, batch_size: int, epochs: int) -> None:
        if self.av is None:
            self.av = self._build_strategy(batch_size, epochs)
        # record=True swallows them: Avalanche's deprecation decorator forces its own "always" filter
        with warnings.catch_warnings(record=True):
            self.av.train(to_avalanche_experience(split, index, task_id))
        self.model = self.av.model  # GDumb trains a fresh copy of the initial model every experience

    def train_experience(self, exp: Experience, data: Split, epochs: int, batch_size: int) -> None:
        self._train(data, exp.index, exp.task_id, batch_size, epochs)

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        """Online: each stream mini-batch is one Avalanche experience (``split_online_stream``)."""
        self._train(Split(x, y), self.mini_index, task_id, len(y), 1)
        self.mini_index += 1
        return {}

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        from avalanche.models import SCRModel

        self.model.eval()
        if isinstance(self.model, SCRModel) and not self.model.eval_classifier.class_means_dict:
            return torch.full((len(x), self.ctx.n_classes), float("-inf"), device=self.device)  # nothing learned yet
        out = self.model(x.to(self.device))
        scores = torch.full((len(x), self.ctx.n_classes), float("-inf"), device=out.device)
        k = min(out.shape[1], self.ctx.n_classes)
        scores[:, :k] = out[:, :k]
        return scores

