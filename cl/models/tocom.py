"""ToCom: a token compensator that lets a ViT run with another token-merging rate than it was tuned at.

"Token Compensator: Altering Inference Cost of Vision Transformer without Re-Tuning", Jie, Tang,
Guo, Zhang, Deng, ECCV 2024, https://arxiv.org/abs/2408.06798 (official code: JieShibo/ToCom,
``models.py``, ``engine.py``, ``losses.py``, ``main.py``).

A model tuned with ToMe merging r_s tokens per block (:mod:`cl.models.tome`) loses accuracy when run
at another r_t. ToCom adds, in every block, low-rank branches on the query and value projections
only (the keys, hence the merging metric, are untouched)::

    q += s * U_q diag(m(r_t) - m(r_s)) D_q LN1(x),   v likewise,

with D in R^{R x d}, U in R^{d x R} zero-initialised, no bias, no activation, dropout on the rank
channels in training. The R = r_max * dim channels form r_max chunks of ``dim``; m(r) switches on
the last ``dim * r`` channels. So going from a to b uses the chunks a+1..b (with sign(b - a)) and
Delta(a->b) + Delta(b->c) = Delta(a->c), Delta(a->a) = 0. The branches are trained once per backbone
by self-distillation: teacher = the frozen backbone merging r_s, student = the same weights plus
ToCom merging r_t, with r_s != r_t drawn uniformly from {0..r_max} at every step (one pair for all
blocks and the whole batch). The update is linear, so it folds exactly into ``qkv`` rows 0:d (q)
and 2d:3d (v) for each (r_s, r_t) pair (:meth:`TokenCompensator.merged_qkv`).

Our reconstruction, and where we deviate:

* r_max is a setting (official: 16, fixed for DeiT-B's 197 tokens): chunk k serves the step from
  r = k-1 to r = k, for any r_max; the official layout is r_max = 16, dim = 2 (R = 32).
* The branches are forward hooks on ``attn.qkv`` (its input is LN1(x)), so they compose with ToMe's
  block wrapper and with PEFT hooks, and never edit timm code.
* Distillation target. The official teacher is DeiT-B with its ImageNet head (soft KL, tau = 1). The
  framework's own pretrained backbones keep no head (``num_classes=0``), so ``loss: kl`` first fits a
  linear head on the frozen teacher's r = 0 features of the distillation data (full-batch Adam,
  seeded) and distils through it; ``loss: mse`` matches the pooled features directly. The KL is
  normalised as in the official ``DistillationLoss`` (sum over the batch / numel, times tau^2).
* Data: the pretraining data of the backbone (``backbone.weights.pretrain``, by default the base
  session), not ImageNet; a hub or file backbone uses the base session too. The backbone stays in
  eval mode (no drop-path, no mixup/cutmix); random crop and flip as in the framework's pretraining.
* Deployment: a run trains its downstream model at r_train (= r_s) and evaluates at r_eval (= r_t),
  adding s * Delta(r_train -> r_eval). s is chosen on validation data (``benchmark.validation`` with
  ``cl tune`` or a few runs compared on their ``validation`` block), never on test (the official
  README selects it on the test split).
"""

from __future__ import annotations

import errno
import json
import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from cl.config import BackboneConfig, CompensatorConfig, PretrainConfig, TomeConfig, config_hash
from cl.data.benchmark import Benchmark, Split
from cl.data.transforms import BatchTransform, random_crop_flip
from cl.errors import ConfigError, TrainingDiverged, WeightsError
from cl.models.tome import TokenMerging, tome_support_error
from cl.utils import atomic_save, git_info, load_error_summary, package_versions, state_dict_sha256, write_json

FORMAT = 1


# ---- the maths ----------------------------------------------------------------------------------


def chunk_mask(r: int, r_max: int, dim: int) -> Tensor:
    """m(r): the last ``dim * r`` of the ``r_max * dim`` rank channels on, the others off."""
    if not 0 <= r <= r_max:
        raise ValueError(f"r {r} is outside 0..{r_max}")
    m = torch.zeros(r_max * dim)
    if r:
        m[-dim * r:] = 1.0
    return m


def delta_weight(up: Tensor, down: Tensor, r_from: int, r_to: int, r_max: int, dim: int) -> Tensor:
    """Delta(r_from -> r_to) = U diag(m(r_to) - m(r_from)) D, a [d_out, d_in] weight update."""
    mask = chunk_mask(r_to, r_max, dim) - chunk_mask(r_from, r_max, dim)
    return (up * mask.to(up)) @ down


def tocom_num_parameters(depth: int, d: int, r_max: int, dim: int, d_out: int | None = None) -> int:
    """Parameters of the compensator: per block, D and U for q and for v."""
    rank = r_max * dim
    return depth * 2 * (rank * d + (d_out or d) * rank)


def soft_kl(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    """Soft distillation as the official ``DistillationLoss``: sum KL(teacher || student) at
    temperature tau over the batch, divided by ``student.numel()``, times tau^2."""
    log_s = F.log_softmax(student / tau, dim=-1)
    log_t = F.log_softmax(teacher / tau, dim=-1)
    return F.kl_div(log_s, log_t, reduction="sum", log_target=True) * (tau * tau) / student.numel()


def draw_pair(r_max: int, g: torch.Generator) -> tuple[int, int]:
    """(r_s, r_t) uniform over ordered pairs of distinct rates in {0..r_max}."""
    r_s = int(torch.randint(0, r_max + 1, (1,), generator=g))
    r_t = int(torch.randint(0, r_max, (1,), generator=g))
    return r_s, r_t + (r_t >= r_s)


# ---- the module ---------------------------------------------------------------------------------


class TokenCompensator(nn.Module):
    """ToCom branches for every block of one ViT, installed as forward hooks on ``attn.qkv``.

    ``down`` [L, 2, R, d] and ``up`` [L, 2, d_out, R] hold (q, v) for each block. ``pair`` = (r_from,
    r_to) selects the chunks and ``scale`` is s; with r_from == r_to the hooks add nothing.
    """

    def __init__(self, depth: int, d: int, r_max: int, dim: int, dropout: float = 0.1, d_out: int | None = None) -> None:
        super().__init__()
        self.depth, self.d, self.r_max, self.dim = depth, d, r_max, dim
        self.d_out = d_out or d
        rank = r_max * dim
        bound = 1.0 / math.sqrt(d)  # nn.Linear's default init of the down projection
        self.down = nn.Parameter(torch.empty(depth, 2, rank, d).uniform_(-bound, bound))
        self.up = nn.Parameter(torch.zeros(depth, 2, self.d_out, rank))
        self.dropout = nn.Dropout(dropout)
        self.pair = (0, 0)
        self.scale = 0.1
        self._handles: list[Any] = []

    @classmethod
    def for_model(cls, model: nn.Module, r_max: int, dim: int, dropout: float = 0.1) -> TokenCompensator:
        qkv = model.blocks[0].attn.qkv
        return cls(len(model.blocks), qkv.in_features, r_max, dim, dropout, qkv.out_features // 3)

    def delta(self, block: int, r_from: int, r_to: int) -> tuple[Tensor, Tensor]:
        """(Delta_q, Delta_v) of one block for r_from -> r_to, unscaled."""
        return tuple(delta_weight(self.up[block, j], self.down[block, j], r_from, r_to, self.r_max, self.dim) for j in (0, 1))  # type: ignore[return-value]

    def branch(self, block: int, x: Tensor) -> Tensor:
        """s * [Delta_q x, 0, Delta_v x] for the current pair: what is added to ``qkv(x)``."""
        r_from, r_to = self.pair
        mask = (chunk_mask(r_to, self.r_max, self.dim) - chunk_mask(r_from, self.r_max, self.dim)).to(x)
        h = self.dropout(torch.einsum("...i,jri->j...r", x, self.down[block].to(x)))  # [2, ..., R]
        q, v = torch.einsum("j...r,jor->j...o", h * mask, self.up[block].to(x)).unbind(0)
        return self.scale * torch.cat([q, torch.zeros_like(q), v], dim=-1)

    def _hook(self, block: int) -> Any:
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            if self.pair[0] == self.pair[1] or self.scale == 0:
                return out
            return out + self.branch(block, args[0])

        return hook

    def attach(self, model: nn.Module) -> TokenCompensator:
        if self._handles:
            raise RuntimeError("the compensator is already attached")
        if len(model.blocks) != self.depth or model.blocks[0].attn.qkv.in_features != self.d:
            raise ConfigError(f"backbone.tome.compensator: built for {self.depth} blocks of width {self.d}, the backbone has "
                              f"{len(model.blocks)} of width {model.blocks[0].attn.qkv.in_features}")
        self._handles = [blk.attn.qkv.register_forward_hook(self._hook(i)) for i, blk in enumerate(model.blocks)]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def merged_qkv(self, model: nn.Module, r_from: int, r_to: int, scale: float) -> dict[str, Tensor]:
        """New ``blocks.i.attn.qkv.weight`` values with s * Delta folded into rows 0:d (q) and 2d:3d (v)."""
        out = {}
        for i, blk in enumerate(model.blocks):
            w = blk.attn.qkv.weight.detach().clone()
            dq, dv = self.delta(i, r_from, r_to)
            n = self.d_out
            w[:n] += scale * dq.to(w)
            w[2 * n:] += scale * dv.to(w)
            out[f"blocks.{i}.attn.qkv.weight"] = w
        return out


# ---- one backbone's ToMe + ToCom at run time ----------------------------------------------------


class TomeRuntime:
    """ToMe (and ToCom) on a run's backbone: r_train for training data, r_eval (+ s * Delta) for evaluation."""

    def __init__(self, model: nn.Module, cfg: TomeConfig, compensator: TokenCompensator | None = None,
                 compensator_sha256: str | None = None) -> None:
        self.cfg, self.compensator, self.compensator_sha256 = cfg, compensator, compensator_sha256
        self.compensator_path: str | None = None  # its file (cache or backbone.tome.compensator.path); None if not written
        self.backbone_sha256: str | None = None
        self.tome = TokenMerging(model, cfg.r_train, cfg.prop_attn).attach()
        if compensator is not None:
            compensator.eval().attach(model)
            compensator.scale = cfg.scale
        self._set("train")

    def _set(self, name: str) -> None:
        if name not in ("train", "eval"):
            raise ValueError(f"unknown phase {name!r}")
        self.current = name
        self.tome.r = self.cfg.r_train if name == "train" else self.cfg.r_eval
        if self.compensator is not None:
            self.compensator.pair = (self.cfg.r_train, self.cfg.r_train if name == "train" else self.cfg.r_eval)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        old = self.current
        self._set(name)
        try:
            yield
        finally:
            self._set(old)

    def key(self) -> dict[str, Any]:
        """What the features depend on (part of the feature cache key)."""
        return {"r_train": self.cfg.r_train, "r_eval": self.cfg.r_eval, "prop_attn": self.cfg.prop_attn,
                **({"scale": self.cfg.scale, "compensator": self.compensator_sha256} if self.compensator is not None else {})}

    @property
    def phases_differ(self) -> bool:
        return self.cfg.r_train != self.cfg.r_eval

    def detach(self) -> None:
        self.tome.detach()
        if self.compensator is not None:
            self.compensator.detach()


# ---- training -----------------------------------------------------------------------------------


@torch.no_grad()
def _features(model: nn.Module, x: Tensor, transform: BatchTransform, device: torch.device, batch_size: int) -> Tensor:
    return torch.cat([model(transform(x[i:i + batch_size], device)).float() for i in range(0, len(x), batch_size)])


def fit_head(features: Tensor, y: Tensor, seed: int, steps: int = 300, lr: float = 0.01) -> nn.Linear:
    """A linear classifier on frozen features (full-batch Adam, seeded): the distillation head."""
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], int(y.max()) + 1).to(features.device)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(head(features), y).backward()
        opt.step()
    return head.requires_grad_(False).eval()


def train_compensator(
    model: nn.Module, x: Tensor, y: Tensor, transform: BatchTransform, ccfg: CompensatorConfig, device: torch.device,
    progress: bool = False,
) -> tuple[TokenCompensator, dict[str, Any]]:
    """Self-distil a fresh compensator for the frozen ``model`` on uint8 images ``x`` (labels ``y``
    are used only to fit the KL head). Returns (compensator, statistics with the loss curve)."""
    torch.manual_seed(ccfg.seed)
    comp = TokenCompensator.for_model(model, ccfg.r_max, ccfg.dim, ccfg.dropout).to(device)
    comp.scale = ccfg.train_scale
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False).eval()
    tome = TokenMerging(model, 0).attach()
    comp.attach(model)
    g = torch.Generator().manual_seed(ccfg.seed)
    history: list[dict[str, Any]] = []
    try:
        head = None
        if ccfg.loss == "kl":
            head = fit_head(_features(model, x, transform, device, 256), y.to(device), ccfg.seed)
        opt = torch.optim.AdamW(comp.parameters(), lr=ccfg.lr, weight_decay=ccfg.weight_decay)
        total = math.ceil(len(y) / ccfg.batch_size) * ccfg.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        bar = tqdm(total=total, desc="tocom", disable=None if progress else True, leave=False)
        for epoch in range(ccfg.epochs):
            loss_sum, seen = 0.0, 0
            for xb_u8, _ in Split(x, y).batches(ccfg.batch_size, g):
                xb = transform(xb_u8, device)
                if ccfg.augment:
                    xb = random_crop_flip(xb, g)
                r_s, r_t = draw_pair(ccfg.r_max, g)
                with torch.no_grad():
                    tome.r, comp.pair = r_s, (r_s, r_s)
                    comp.eval()
                    teacher = model(xb)
                tome.r, comp.pair = r_t, (r_s, r_t)
                comp.train()
                student = model(xb)
                if head is not None:
                    loss = soft_kl(head(student), head(teacher), ccfg.temperature)
                else:
                    loss = F.mse_loss(student, teacher)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"compensator training diverged (loss {loss.item()} in epoch {epoch}); lower backbone.tome.compensator.lr. Nothing was cached")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.item() * len(xb)
                seen += len(xb)
                bar.update()
            history.append({"epoch": epoch, "loss": loss_sum / max(seen, 1)})
            bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4g}")
        bar.close()
    finally:
        comp.detach()
        tome.detach()
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
    comp.eval().pair = (0, 0)
    return comp, {"history": history, "n_samples": len(y)}


# ---- files and the cache ------------------------------------------------------------------------


def _state(comp: TokenCompensator) -> dict[str, Tensor]:
    return {"down": comp.down.detach().cpu().contiguous(), "up": comp.up.detach().cpu().contiguous()}


def save_compensator(path: Path, comp: TokenCompensator, backbone_sha256: str) -> str:
    """Write ``comp`` as safetensors with its backbone checksum in the metadata; returns its sha256."""
    state = _state(comp)
    sha = state_dict_sha256(state)
    meta = {"format": str(FORMAT), "backbone_sha256": backbone_sha256, "r_max": str(comp.r_max), "dim": str(comp.dim), "sha256": sha}
    atomic_save(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    return sha


def load_compensator(path: Path, model: nn.Module, backbone_sha256: str, ccfg: CompensatorConfig, key: str = "backbone.tome.compensator.path") -> tuple[TokenCompensator, str]:
    """Read a compensator file, checked against this backbone (weights checksum, shapes) and the config."""
    if not path.is_file():
        raise WeightsError(f"{key}: file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line
        raise WeightsError(f"{key}: {path} is not a compensator file ({load_error_summary(err)})") from None
    if meta.get("backbone_sha256") != backbone_sha256:
        raise WeightsError(f"{key}: {path.name} was trained for backbone sha256 {str(meta.get('backbone_sha256'))[:12]}..., "
                           f"this run's backbone is {backbone_sha256[:12]}...; train one for it (cl tocom)")
    if set(state) != {"down", "up"} or state_dict_sha256(state) != meta.get("sha256"):
        raise WeightsError(f"{key}: {path} is damaged (checksum mismatch)")
    if (int(meta.get("r_max", -1)), int(meta.get("dim", -1))) != (ccfg.r_max, ccfg.dim):
        raise ConfigError(f"backbone.tome.compensator.r_max/dim: {ccfg.r_max}/{ccfg.dim}, but {path.name} has {meta.get('r_max')}/{meta.get('dim')}")
    comp = TokenCompensator.for_model(model, ccfg.r_max, ccfg.dim, ccfg.dropout)
    if comp.down.shape != state["down"].shape or comp.up.shape != state["up"].shape:
        raise WeightsError(f"{key}: {path.name} does not fit this backbone's shapes")
    comp.load_state_dict(state, strict=False)
    return comp, meta["sha256"]


def export_compensator(runtime: TomeRuntime, dest: Path) -> None:
    """Write the compensator ``runtime`` uses to ``dest`` (``cl tocom --save``): a copy of its file, or
    the compensator itself when there is no file (the cache could not be written). ``dest`` being
    that very file is a no-op."""
    comp = runtime.compensator
    assert comp is not None
    if dest.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(dest))
    src = runtime.compensator_path
    if src is not None and Path(src).is_file():
        if dest.exists() and dest.resolve() == Path(src).resolve():
            return
        atomic_save(dest, lambda tmp: tmp.write_bytes(Path(src).read_bytes()))
        return
    save_compensator(dest, comp, runtime.backbone_sha256)


def compensator_key(backbone_sha256: str, ccfg: CompensatorConfig, data_sha256: str, transform: BatchTransform, device: torch.device) -> str:
    return config_hash({
        "format": FORMAT, "backbone": backbone_sha256, "tocom": ccfg.model_dump(mode="json", exclude={"path"}), "data": data_sha256,
        "transform": transform.to_dict(), "threads": torch.get_num_threads(), "device": device.type,
    })


def get_compensator(
    model: nn.Module, backbone_sha256: str, bcfg: BackboneConfig, bench: Benchmark, *, data_root: Path, cache_dir: Path,
    seed: int, device: torch.device, progress: bool = False,
) -> tuple[TokenCompensator, dict[str, Any]]:
    """The compensator of ``bcfg.tome.compensator`` for this backbone: read from its file, from the
    cache, or trained by self-distillation on the backbone's pretraining data and cached."""
    from cl.models.pretrain import _data_sha256, pretraining_data

    assert bcfg.tome is not None and bcfg.tome.compensator is not None
    ccfg = bcfg.tome.compensator
    if ccfg.path is not None:
        comp, sha = load_compensator(Path(ccfg.path), model, backbone_sha256, ccfg)
        return comp, {"source": "file", "path": str(Path(ccfg.path).resolve()), "sha256": sha, "backbone_sha256": backbone_sha256}
    pcfg = bcfg.weights.pretrain or PretrainConfig()
    x, y, transform, description = pretraining_data(pcfg, bench, data_root, seed)
    data_sha = _data_sha256(x, y)
    key = compensator_key(backbone_sha256, ccfg, data_sha, transform, device)
    path = cache_dir / "tocom" / f"{bcfg.name}-{key}.safetensors"
    meta_path = path.with_suffix(".json")
    if path.is_file():
        try:
            comp, sha = load_compensator(path, model, backbone_sha256, ccfg, key=f"cached compensator {path}")
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != key:
                raise ValueError("provenance of another compensator")
            return comp, {**meta, "cache": "hit"}
        except Exception as err:  # noqa: BLE001 - a damaged entry is trained again
            warnings.warn(f"cached compensator {path} is unusable ({load_error_summary(err)}); training again", stacklevel=2)
    start = time.perf_counter()
    comp, stats = train_compensator(model, x, y, transform, ccfg, device, progress)
    meta = {
        "key": key, "path": str(path), "trained_on": description, "backbone_sha256": backbone_sha256, "arch": bcfg.name,
        "r_range": [0, ccfg.r_max], "tocom": ccfg.model_dump(mode="json", exclude={"path"}), "data_sha256": data_sha,
        "transform": transform.to_dict(), "threads": torch.get_num_threads(), "device": device.type,
        "trainable_params": sum(p.numel() for p in comp.parameters()), "wall_time_s": round(time.perf_counter() - start, 3),
        "git": git_info(), "packages": package_versions(), **stats,
    }
    try:
        meta["sha256"] = save_compensator(path, comp, backbone_sha256)
        write_json(meta_path, meta)
    except OSError as err:
        warnings.warn(f"could not cache the compensator in {path.parent} ({err.strerror}); continuing without caching", stacklevel=2)
        meta.update(sha256=state_dict_sha256(_state(comp)), path=None)
        return comp, {**meta, "cache": "not written"}
    return comp, {**meta, "cache": "miss"}


def install_tome(backbone: Any, bcfg: BackboneConfig, bench: Benchmark, *, data_root: Path, cache_dir: Path, seed: int,
                 device: torch.device, progress: bool = False) -> TomeRuntime:
    """Put ``bcfg.tome`` on a built backbone (``backbone.tome``), training or loading its compensator."""
    tcfg = bcfg.tome
    assert tcfg is not None
    error = tome_support_error(backbone.model)
    if error is not None:
        raise ConfigError(f"backbone.tome: {error} ({bcfg.name})")
    comp, info = None, None
    if tcfg.compensator is not None:
        comp, info = get_compensator(backbone.model, backbone.weights["sha256"], bcfg, bench, data_root=data_root,
                                     cache_dir=cache_dir, seed=seed, device=device, progress=progress)
        comp.to(device)
    runtime = TomeRuntime(backbone.model, tcfg, comp, None if info is None else info["sha256"])
    runtime.compensator_path = None if info is None else info.get("path")
    runtime.backbone_sha256 = backbone.weights["sha256"]
    backbone.tome = runtime
    backbone.weights["tome"] = {**tcfg.model_dump(mode="json", exclude={"compensator"}),
                                "compensator": None if info is None else {k: info.get(k) for k in ("sha256", "path", "cache", "backbone_sha256", "r_range", "history")}}
    return runtime
