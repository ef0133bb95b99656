"""Images that stay on disk until a batch needs them.

A dataset of image files (ImageNet-R, DomainNet, CUB, any folder tree) is far larger decoded than
encoded: ImageNet-R at 224 px is ~3.6 GB of uint8 pixels, DomainNet ~90 GB. :class:`DiskImages`
stands where a uint8 tensor ``[N, C, S, S]`` would: indexing it with rows gives another view (nothing
is decoded), and batches are decoded when they are needed, in ``DataLoader`` worker processes when
``loader.num_workers`` > 0. Decoding is a pure function of a file's bytes and of :class:`Decode`, so a
streamed run sees exactly the pixels an eager one does, whatever the number of workers.

Loader settings (workers, pinned memory) are process-wide, like the torch thread count: they change
how fast batches arrive, never what they hold, so they are not part of a run's identity.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from cl.errors import DataError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


@dataclass(frozen=True)
class Decode:
    """How one image file becomes uint8 ``[C, size, size]``.

    ``resize: squash`` scales the whole image to ``size x size`` (aspect ratio not kept);
    ``resize: crop`` is timm's evaluation transform: the shorter side is scaled to
    ``floor(size / crop_pct)``, then the centre ``size x size`` is cut out.
    """

    size: int
    mode: str = "RGB"  # "L" (grey) or "RGB"
    resize: str = "squash"
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.mode not in ("L", "RGB") or self.resize not in ("squash", "crop") or self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"bad decode settings {self}")
        if not 0 < self.crop_pct <= 1 or self.size < 1:
            raise ValueError(f"bad decode settings {self}")

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def __call__(self, raw: bytes, where: str | Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        resample = getattr(Image.Resampling, self.interpolation.upper())
        try:
            img = Image.open(io.BytesIO(raw)).convert(self.mode)
            if self.resize == "squash":
                img = img.resize((self.size, self.size), resample)
            else:
                w, h = img.size
                short = math.floor(self.size / self.crop_pct)
                nw, nh = (short, max(short, int(short * h / w))) if w <= h else (max(short, int(short * w / h)), short)
                img = img.resize((nw, nh), resample)
                left, top = int(round((nw - self.size) / 2.0)), int(round((nh - self.size) / 2.0))
                img = img.crop((left, top, left + self.size, top + self.size))
        except UnidentifiedImageError:
            raise DataError(f"{where}: unreadable image (not a recognised image format)") from None
        except (OSError, ValueError) as err:
            raise DataError(f"{where}: unreadable image ({err})") from None
        arr = np.asarray(img, dtype=np.uint8)
        return arr.reshape(self.size, self.size, -1).transpose(2, 0, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(paths: Sequence[str]) -> list[str]:
    """sha256 of every file (threads: hashing releases the GIL), or a one-line error naming a missing one."""
    try:
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
            return list(pool.map(_file_digest, paths, chunksize=64))
    except OSError as err:
        raise DataError(f"{err.filename}: cannot read data file ({err.strerror})") from None


class ImageFiles:
    """The image files of one split, shared by all its views: paths, their sha256, and how to decode."""

    def __init__(self, paths: Sequence[str | Path], decode: Decode, digests: Sequence[str] | None = None) -> None:
        self.paths = [str(p) for p in paths]
        self.decode = decode
        self.digests = list(digests) if digests is not None else file_digests(self.paths)
        if len(self.digests) != len(self.paths):
            raise ValueError("one digest per file")
        self._loader: Any = None
        self._loader_options: LoaderOptions | None = None
        self._busy = False

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict[str, Any]:  # worker processes get the files, not the loader
        return {**self.__dict__, "_loader": None, "_busy": False}

    def decode_rows(self, rows: Sequence[int] | Tensor) -> Tensor:
        rows = rows.tolist() if isinstance(rows, Tensor) else list(rows)
        c, s = self.decode.channels, self.decode.size
        out = np.empty((len(rows), c, s, s), dtype=np.uint8)
        for i, r in enumerate(rows):
            path = self.paths[r]
            try:
                raw = Path(path).read_bytes()
            except OSError as err:
                raise DataError(f"{path}: cannot read data file ({err.strerror})") from None
            out[i] = self.decode(raw, path)
        return torch.from_numpy(out)

    def rows_sha256(self, rows: Tensor) -> str:
        """What rows ``rows`` are made of: their files' bytes, in order, and how they are decoded."""
        h = hashlib.sha256(repr(sorted(self.decode.to_dict().items())).encode())
        for r in rows.tolist():
            h.update(bytes.fromhex(self.digests[r]))
        return h.hexdigest()

    @contextlib.contextmanager
    def _loader_for(self, plan: list[Tensor], options: LoaderOptions) -> Iterator[Any]:
        """A DataLoader decoding ``plan`` (row batches); the persistent one unless it is in use."""
        persistent = options.persistent_workers and not self._busy
        if persistent and (self._loader is None or self._loader_options != options):
            self._loader = _make_loader(self, _Plan(), options, persistent=True)
            self._loader_options = options
        loader = self._loader if persistent else _make_loader(self, _Plan(), options, persistent=False)
        loader.batch_sampler_plan.batches = plan
        if persistent:
            self._busy = True
        try:
            yield loader
        finally:
            if persistent:
                self._busy = False

    def iterate(self, plan: list[Tensor]) -> Iterator[Tensor]:
        """uint8 batches for each row batch of ``plan``, in order."""
        options = LOADER
        if options.num_workers == 0 or len(plan) <= 1:
            for rows in plan:
                yield self.decode_rows(rows)
            return
        with self._loader_for(plan, options) as loader:
            try:
                yield from loader
            except DataError as err:  # a worker's error arrives with its traceback: keep its last line
                last = str(err).strip().splitlines()[-1]
                raise DataError(last.split("DataError: ", 1)[-1]) from None


class _Plan:
    """A sampler whose batches are replaced before each pass: persistent workers survive across passes."""

    def __init__(self) -> None:
        self.batches: list[Tensor] = []

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _RowDecoder(torch.utils.data.Dataset):
    def __init__(self, files: ImageFiles) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, rows: Tensor) -> Tensor:
        return self.files.decode_rows(rows)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is PIL's; the main process owns the cores for the model


def _make_loader(files: ImageFiles, plan: _Plan, options: LoaderOptions, persistent: bool) -> Any:
    loader = torch.utils.data.DataLoader(
        _RowDecoder(files), sampler=plan, batch_size=None, num_workers=options.num_workers,
        pin_memory=options.pin_memory, persistent_workers=persistent, prefetch_factor=options.prefetch_factor,
        worker_init_fn=_worker_init,
    )
    loader.batch_sampler_plan = plan
    return loader


@dataclass(frozen=True)
class LoaderOptions:
    """How batches of images on disk are produced (see ``loader`` in a run config)."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = True
    prefetch_factor: int = 2
    stream: str = "auto"  # "auto" | "always" | "never"
    max_in_memory_gb: float = 1.0  # auto: decode into memory only below this


LOADER = LoaderOptions()


def configure_loader(options: LoaderOptions) -> None:
    """Set the process-wide loader options (a run sets them from its ``loader`` section)."""
    global LOADER
    LOADER = options


@contextlib.contextmanager
def loader_options(**changes: Any) -> Iterator[None]:
    global LOADER
    before = LOADER
    LOADER = replace(before, **changes)
    try:
        yield
    finally:
        LOADER = before


class DiskImages:
    """Rows of an :class:`ImageFiles`, standing where a uint8 ``[N, C, S, S]`` tensor would.

    ``x[rows]`` (slice, index tensor, mask) is another view; ``x[i]`` decodes one image;
    :meth:`load` decodes all; :meth:`iterate` decodes batches (in workers when configured).
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, files: ImageFiles, rows: Tensor | None = None) -> None:
        self.files = files
        self.rows = torch.arange(len(files)) if rows is None else rows.to(torch.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"DiskImages({len(self)} of {len(self.files)} files, {self.files.decode})"

    @property
    def shape(self) -> torch.Size:
        d = self.files.decode
        return torch.Size((len(self), d.channels, d.size, d.size))

    @property
    def nbytes_decoded(self) -> int:
        return int(np.prod(self.shape))

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)) or (isinstance(key, Tensor) and key.ndim == 0 and key.dtype != torch.bool):
            return self.files.decode_rows([int(self.rows[int(key)])])[0]
        if isinstance(key, slice):
            return DiskImages(self.files, self.rows[key])
        key = torch.as_tensor(key)
        return DiskImages(self.files, self.rows[key if key.dtype == torch.bool else key.to(torch.int64)])

    def iterate(self, batches: Sequence[Tensor]) -> Iterator[Tensor]:
        """Decoded uint8 batches for each batch of positions (in this view) of ``batches``."""
        return self.files.iterate([self.rows[b] for b in batches])

    def load(self, batch_size: int = 256) -> Tensor:
        """All rows decoded into one uint8 tensor."""
        out = torch.empty(self.shape, dtype=torch.uint8)
        plan = [torch.arange(s, min(s + batch_size, len(self))) for s in range(0, len(self), batch_size)]
        for b, xb in zip(plan, self.iterate(plan)):
            out[b] = xb
        return out

    def sha256(self) -> str:
        return self.files.rows_sha256(self.rows)


def as_tensor(x: Tensor | DiskImages) -> Tensor:
    """``x`` as a tensor, decoding it if it is on disk."""
    return x.load() if isinstance(x, DiskImages) else x


def cat_images(parts: Sequence[Tensor | DiskImages]) -> Tensor | DiskImages:
    """``torch.cat`` for tensors, or one view over the rows of views of the same files."""
    if parts and all(isinstance(p, DiskImages) for p in parts):
        files = parts[0].files  # type: ignore[union-attr]
        if all(p.files is files for p in parts):  # type: ignore[union-attr]
            return DiskImages(files, torch.cat([p.rows for p in parts]))  # type: ignore[union-attr]
    return torch.cat([as_tensor(p) for p in parts])


def iterate_batches(x: Tensor | DiskImages, batch_size: int) -> Iterator[Tensor]:
    """Consecutive uint8 batches of ``x`` (tensor slices, or decoded from disk)."""
    if isinstance(x, DiskImages):
        yield from x.iterate([torch.arange(s, min(s + batch_size, len(x))) for s in range(0, len(x), batch_size)])
    else:
        for s in range(0, len(x), batch_size):
            yield x[s : s + batch_size]


def images_sha256(*pools: Tensor | DiskImages) -> str:
    """sha256 of image pools: tensor bytes, or for files their bytes and decode settings."""
    from cl.utils import tensor_sha256

    if not any(isinstance(p, DiskImages) for p in pools):
        return tensor_sha256(*pools)  # type: ignore[arg-type]
    h = hashlib.sha256()
    for p in pools:
        h.update((p.sha256() if isinstance(p, DiskImages) else tensor_sha256(p)).encode())
    return h.hexdigest()


STATS_LIMIT = 2048


def channel_stats_exact(x: Tensor | DiskImages, subsample: bool = True, seed: int = 0) -> tuple[list[float], list[float], int]:
    """Per-channel (mean, std) in [0, 1] units from exact integer sums over ``x``, or with
    ``subsample`` over a seeded subsample of :data:`STATS_LIMIT` images when ``x`` is larger (the same
    rows whether ``x`` is on disk or in memory). Batched: memory does not grow with ``x``. Returns the
    number of images used as well."""
    if subsample and len(x) > STATS_LIMIT:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:STATS_LIMIT].sort().values]
    c = int(x.shape[1])
    s1 = torch.zeros(c, dtype=torch.int64)
    s2 = torch.zeros(c, dtype=torch.int64)
    n = 0
    for xb in iterate_batches(x, 256):
        v = xb.transpose(0, 1).reshape(c, -1).to(torch.int64)
        s1 += v.sum(dim=1)
        s2 += (v * v).sum(dim=1)
        n += v.shape[1]
    means = [a / n / 255 for a in s1.tolist()]
    stds = [math.sqrt(max(b - a * a / n, 0) / max(n - 1, 1)) / 255 for a, b in zip(s1.tolist(), s2.tolist())]
    return means, stds, len(x)
