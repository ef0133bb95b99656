"""DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning.

Wang, Zhang, Ebrahimi, Sun, Zhang, Lee, Ren, Su, Perot, Dy, Pfister. ECCV 2022.
arXiv: https://arxiv.org/abs/2204.04799 (official JAX code: google-research/l2p; PyTorch port:
JH-LEE-KR/dualprompt-pytorch).

A frozen ViT gets two kinds of prefix prompts (:mod:`cl.models.prefix`): a G(eneral)-prompt in the
blocks ``g_layers``, shared by every task, and an E(xpert)-prompt per task in the blocks
``e_layers``, each with a learnable key. Training on task t uses E_t directly and minimises the
cross-entropy over task t's classes minus ``pull`` × the mean cosine between the frozen model's
pre-logits feature (the query) and key k_t, which pulls k_t towards task t's queries. At test time
every sample picks i* = argmax_i cos(q, k_i) over the trained tasks' keys and is classified with
G + E_{i*} over all classes seen; the chosen task is returned to the loop, which logs the
key-matching (task-id) accuracy. One shared linear head reads the prompted model's pre-logits.

Our reconstruction, and where it differs from the official code:

* Selection is per sample. The official CIFAR config applies the batch's majority prompt to every
  sample (``batchwise_prompt``), which leaks the task through per-task test batches; it is not
  offered. Keys are matched over the *trained* tasks only (the official code also scores the
  untrained, randomly initialised keys of later slots).
* ``prefix_form: code`` (default) is the official form: separate key and value prefixes of length
  L each, added after the key/value projections. ``prefix_form: paper`` is the paper's equation:
  one prompt of length L whose halves are prepended to the block's input before its key/value
  projections (L must be even).
* Layers past the model's depth are dropped (the defaults assume ViT-B's 12 blocks), with a
  one-line error when no E-layer is left. G- and E-layers may not overlap.
* E-prompts and keys are one parameter per slot, so the optimiser (fresh per task) only ever holds
  the current slot: earlier prompts are bit-identical whatever the optimiser or weight decay.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PrivateAttr
from torch import Tensor, nn

from cl.config import RunConfig
from cl.data.benchmark import Experience
from cl.errors import ConfigError
from cl.models.prefix import Prefix, prefixed
from cl.peft.base import backbone_family, vit_dim
from cl.registry import STRATEGIES
from cl.strategies.base import OptimConfig, Strategy, StrategyContext, make_optimizer

Form = Literal["code", "paper"]


class DualPromptConfig(OptimConfig):
    name: Literal["dualprompt"] = "dualprompt"
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(2.8e-3, gt=0, description="official 0.03 × batch 24 / 256 (one device)")
    g_layers: list[int] = Field([0, 1], description="blocks with the shared G-prompt (may be empty)")
    g_length: int = Field(5, ge=1, description="G-prompt length L")
    e_layers: list[int] = Field([2, 3, 4], description="blocks with the task's E-prompt; blocks past the model's depth are dropped")
    e_length: int = Field(5, ge=1, description="E-prompt length L")
    pool_size: int | None = Field(None, ge=1, description="E-prompt slots; default: the number of tasks")
    pull: float = Field(1.0, ge=0, description="weight λ of the key-query cosine term")
    copy_prompt: bool = Field(True, description="before task t, copy E-prompt t-1 into slot t")
    copy_key: bool = Field(False, description="also copy key t-1 into slot t")
    prefix_form: Form = Field("code", description="code: separate key/value prefixes after the projections; paper: halves of one prompt before them")
    _n_tasks: int | None = PrivateAttr(None)

    def check(self, cfg: RunConfig) -> None:
        if cfg.backbone.trainable != "none":
            raise ValueError(f"backbone.trainable: dualprompt prompts a frozen backbone; use 'none' (got '{cfg.backbone.trainable}')")
        for key in ("g_layers", "e_layers"):
            layers = getattr(self, key)
            if any(i < 0 for i in layers) or len(set(layers)) != len(layers):
                raise ValueError(f"strategy.{key}: block indices must be distinct and non-negative (got {layers})")
        if set(self.g_layers) & set(self.e_layers):
            raise ValueError(f"strategy.e_layers: overlaps g_layers in blocks {sorted(set(self.g_layers) & set(self.e_layers))}")
        if self.prefix_form == "paper" and (self.g_length % 2 or self.e_length % 2):
            raise ValueError(f"strategy.prefix_form: 'paper' splits each prompt in halves; g_length and e_length must be even (got {self.g_length}, {self.e_length})")
        n_tasks = cfg.benchmark.n_experiences
        if self.pool_size is not None and self.pool_size < n_tasks:
            raise ValueError(f"strategy.pool_size: {self.pool_size} slots for {n_tasks} tasks (one E-prompt per task)")
        self._n_tasks = n_tasks


def prompt_shape(n_layers: int, length: int, d: int, form: Form) -> tuple[int, ...]:
    """Shape of one prompt set: (layers, 2, L, d) in the code form, (layers, L, d) in the paper form."""
    return (n_layers, 2, length, d) if form == "code" else (n_layers, length, d)


def parameter_counts(d: int, g_layers: int, g_length: int, e_layers: int, e_length: int, form: Form = "code") -> tuple[int, int]:
    """(G-prompt parameters, E-prompt parameters per task without its d-dim key)."""
    g = g_layers * g_length * d * (2 if form == "code" else 1)
    e = e_layers * e_length * d * (2 if form == "code" else 1)
    return g, e


def key_value(prompt: Tensor, form: Form) -> tuple[Tensor, Tensor]:
    """Key and value prefixes of one layer's prompt: (..., 2, L, d) or (..., L, d) -> two (..., L', d)."""
    if form == "code":
        return prompt.select(-3, 0), prompt.select(-3, 1)
    half = prompt.shape[-2] // 2
    return prompt[..., :half, :], prompt[..., half:, :]


def pull_term(query: Tensor, keys: Tensor) -> Tensor:
    """Mean over the batch of cos(q_b, k_b): ``keys`` (B, d) is the key each sample is matched to."""
    return F.cosine_similarity(query, keys, dim=1).mean()


def match_keys(query: Tensor, keys: Tensor) -> Tensor:
    """Per-sample index of the most cosine-similar key: (B, d), (n, d) -> (B,)."""
    return (F.normalize(query, dim=1) @ F.normalize(keys, dim=1).T).argmax(dim=1)


@STRATEGIES.register("dualprompt", config=DualPromptConfig, help="DualPrompt: shared G-prompt + per-task E-prompts (prefix-tuning) on a frozen ViT")
class DualPrompt(Strategy):
    input_kind = "images"
    task_aware_predict = True
    stateful = ("prompts",)

    @classmethod
    def uses_cross_entropy(cls, cfg) -> bool:  # noqa: ANN001
        return True

    def __init__(self, cfg: DualPromptConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: DualPromptConfig = cfg
        self.model = ctx.backbone.model
        if backbone_family(self.model) != "vit":
            raise ConfigError(f"strategy.name: 'dualprompt' needs a timm ViT, not {type(self.model).__name__}")
        n_tasks = cfg._n_tasks
        if cfg.pool_size is None and n_tasks is None:
            raise ConfigError("strategy.pool_size: unknown number of tasks (validate the run config first, or set pool_size)")
        self.pool_size = cfg.pool_size or int(n_tasks)  # type: ignore[arg-type]
        depth = len(self.model.blocks)
        self.g_layers = [i for i in cfg.g_layers if i < depth]
        self.e_layers = [i for i in cfg.e_layers if i < depth]
        if not self.e_layers:
            raise ConfigError(f"strategy.e_layers: {cfg.e_layers} has no block below the model's depth {depth}")
        d = vit_dim(self.model)
        form = cfg.prefix_form
        g = torch.Generator().manual_seed(ctx.seed)

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.rand(*shape, generator=g) * 2 - 1)  # U(-1, 1) as the official code

        params = {"g": uniform(*prompt_shape(len(self.g_layers), cfg.g_length, d, form))}
        for i in range(self.pool_size):
            params[f"e{i}"] = uniform(*prompt_shape(len(self.e_layers), cfg.e_length, d, form))
            params[f"key{i}"] = uniform(d)
        head = nn.Linear(d, ctx.n_classes)
        params["head_weight"], params["head_bias"] = head.weight, head.bias
        self.prompts = nn.ParameterDict(params).to(self.device)
        self.optimizer: torch.optim.Optimizer | None = None

    # ---- forward -----------------------------------------------------------------------------

    def query(self, inputs: Tensor) -> Tensor:
        """The frozen model's pre-logits feature, from a pass without prompts."""
        with torch.no_grad():
            return self.model(inputs)

    def _prefixes(self, e: Tensor, batch: int) -> dict[int, Prefix]:
        """Block -> (key, value) prefixes; ``e`` holds each sample's E-prompt (B, n_e, ...)."""
        form, out = self.cfg.prefix_form, {}
        for j, layer in enumerate(self.g_layers):
            k, v = key_value(self.prompts["g"][j], form)
            out[layer] = (k.expand(batch, -1, -1), v.expand(batch, -1, -1))
        for j, layer in enumerate(self.e_layers):
            out[layer] = key_value(e[:, j], form)
        return out

    def logits(self, inputs: Tensor, slots: int | Tensor) -> Tensor:
        """Head logits with G and, per sample, E-prompt ``slots`` (one int: the same slot for all)."""
        b = len(inputs)
        if isinstance(slots, int):  # training: only this slot enters the graph
            e = self.prompts[f"e{slots}"].expand(b, *self.prompts[f"e{slots}"].shape)
        else:
            e = torch.stack([self.prompts[f"e{i}"] for i in range(self.pool_size)])[slots.to(self.device)]
        with prefixed(self.model, self._prefixes(e, b), project=self.cfg.prefix_form == "paper"):
            feats = self.model(inputs)
        return F.linear(feats, self.prompts["head_weight"], self.prompts["head_bias"])

    def _trained(self) -> list[int]:
        return sorted(self.task_ranges)

    # ---- training ----------------------------------------------------------------------------

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        t = exp.task_id
        if t >= self.pool_size:
            raise ConfigError(f"strategy.pool_size: {self.pool_size} slots, but task {t} arrived")
        if t > 0:
            with torch.no_grad():
                if self.cfg.copy_prompt:
                    self.prompts[f"e{t}"].copy_(self.prompts[f"e{t - 1}"])
                if self.cfg.copy_key:
                    self.prompts[f"key{t}"].copy_(self.prompts[f"key{t - 1}"])
        self.optimizer = make_optimizer(self._task_parameters(t), self.cfg)  # fresh per task, as the official code

    def _task_parameters(self, t: int) -> list[nn.Parameter]:
        p = self.prompts
        return [p["g"], p[f"e{t}"], p[f"key{t}"], p["head_weight"], p["head_bias"]]

    def loss(self, x: Tensor, y: Tensor, task_id: int) -> tuple[Tensor, Tensor, Tensor]:
        """(total, cross-entropy over task ``task_id``'s classes, mean cos(query, key_t))."""
        inputs = self.ctx.backbone.transform(x, self.device)
        query = self.query(inputs)
        logits = self.logits(inputs, task_id)
        lo, hi = self.task_ranges[task_id]
        n = len(y)
        ce = self.classification_loss(logits, y.to(self.device), torch.full((n,), lo, device=self.device), torch.full((n,), hi, device=self.device))
        pull = pull_term(query, self.prompts[f"key{task_id}"].expand(n, -1))
        return ce - self.cfg.pull * pull, ce, pull

    def observe(self, x: Tensor, y: Tensor, task_id: int) -> dict[str, float]:
        assert self.optimizer is not None
        self.model.eval()
        loss, ce, pull = self.loss(x, y, task_id)
        self.optimizer_step(loss, self.optimizer)
        return {"loss": loss.item(), "loss_ce": ce.item(), "cos_key": pull.item()}

    def after_experience(self, exp: Experience) -> None:
        self.optimizer = None

    # ---- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def infer_task(self, x: Tensor) -> Tensor:
        """Per-sample task = argmax cosine between the frozen query and the trained tasks' keys."""
        return self._infer(self.ctx.backbone.transform(x, self.device))

    def _infer(self, inputs: Tensor) -> Tensor:
        tasks = self._trained()
        keys = torch.stack([self.prompts[f"key{t}"] for t in tasks])
        return torch.tensor(tasks)[match_keys(self.query(inputs), keys).cpu()]

    @torch.no_grad()
    def predict_inferring(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Class-incremental scores with each sample's E-prompt chosen by its key, and the chosen tasks."""
        self.model.eval()
        if not self.task_ranges:
            return torch.full((len(x), self.ctx.n_classes), float("-inf"), device=self.device), None
        inputs = self.ctx.backbone.transform(x, self.device)
        tasks = self._infer(inputs)
        scores = self.logits(inputs, tasks)
        scores[:, self.seen_classes :] = float("-inf")
        return scores, tasks

    @torch.no_grad()
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        if task_id is None:
            return self.predict_inferring(x)[0]
        scores = torch.full((len(x), self.ctx.n_classes), float("-inf"), device=self.device)
        if task_id in self.task_ranges:  # task-aware: the task's own E-prompt and classes
            self.model.eval()
            lo, hi = self.task_ranges[task_id]
            scores[:, lo:hi] = self.logits(self.ctx.backbone.transform(x, self.device), task_id)[:, lo:hi]
        return scores

    # ---- bookkeeping -------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.prompts.values())

    def train_mode(self, mode: bool) -> None:
        self.model.eval()

    def storage_bytes(self) -> int:
        """G-prompt, head and the trained tasks' E-prompts and keys (float32)."""
        p = self.prompts
        kept = [p["g"], p["head_weight"], p["head_bias"]]
        kept += [p[f"{name}{t}"] for t in self._trained() for name in ("e", "key")]
        return sum(t.numel() * 4 for t in kept)
