"""Batched input pipeline: uint8 images -> normalised float tensors, plus cheap tensor augmentation.

Everything works on whole batches already in memory, so there is no per-sample Python and no
DataLoader worker start-up; on 2 CPU cores that is most of the wall time of a small run.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BatchTransform:
    """uint8 [B, C_in, H, W] -> float [B, channels, size, size], normalised.

    Args:
        in_channels: channels of the stored images.
        channels: channels the backbone expects (1 <-> 3 conversion by repeat / luminance mean).
        size: output side length, or None to keep the stored size.
        mean, std: per output channel, in [0, 1] units.
    """

    in_channels: int
    channels: int
    size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"  # or "bicubic" (a hub tag's), for resizing stored images to ``size``

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, got {len(self.mean)}/{len(self.std)}")

    def __call__(self, x: Tensor, device: torch.device | str | None = None) -> Tensor:
        if not isinstance(x, Tensor):  # images still on disk (cl.data.disk.DiskImages): decode them here
            x = x.load()
        x = x.to(device=device, non_blocking=True).float().div_(255)
        if self.channels != self.in_channels:
            x = x.expand(-1, 3, -1, -1) if self.channels == 3 else x.mean(dim=1, keepdim=True)
        if self.size is not None and (x.shape[-2], x.shape[-1]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode=self.interpolation, antialias=True, align_corners=False)
            if self.interpolation == "bicubic":
                x = x.clamp_(0, 1)  # bicubic overshoots
        mean, std = _stats(self.mean, self.std, x.device)
        return (x - mean) / std

    def output_shape(self, native: tuple[int, int]) -> tuple[int, int, int]:
        h, w = (self.size, self.size) if self.size is not None else native
        return self.channels, h, w

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        if self.interpolation == "bilinear":  # the only mode before it was a field: cache keys stay as they were
            del out["interpolation"]
        return out


@functools.lru_cache(maxsize=64)
def _stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """Normalisation tensors, made once per device (a tensor built from Python floats on a GPU is a
    blocking host-to-device copy: it would stall every batch)."""
    return torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1)


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int = 2, flip: bool = True) -> Tensor:
    """Per-sample random translation (zero-padded crop) and horizontal flip of a float batch."""
    b, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        off = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(x.device)
        rows = (off[0, :, None] + torch.arange(h, device=x.device))[:, :, None]  # [B, H, 1]
        cols = (off[1, :, None] + torch.arange(w, device=x.device))[:, None, :]  # [B, 1, W]
        batch = torch.arange(b, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


class AugmentedTransform:
    """A :class:`BatchTransform` followed by :func:`random_crop_flip` drawn from ``generator``: what
    the backbone sees of a training batch while ``train.augment`` is on. Everything else (shapes,
    ``to_dict``) is the wrapped transform's."""

    def __init__(self, base: BatchTransform, generator: torch.Generator, padding: int, flip: bool) -> None:
        self.base, self.generator, self.padding, self.flip = base, generator, padding, flip

    def __call__(self, x: Tensor, device: torch.device | str | None = None) -> Tensor:
        return random_crop_flip(self.base(x, device), self.generator, self.padding, self.flip)

    def __getattr__(self, name: str) -> object:
        return getattr(self.base, name)
