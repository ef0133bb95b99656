"""Live progress of a run: experience -> epoch -> batch, with the running loss and samples/s.

On a terminal, nested bars (tqdm): experiences, and below them the batches of the current epoch with
the running mean loss and throughput. Anywhere else (output piped to a file, a SLURM log), one line
per epoch and one per evaluated experience, flushed as they happen, so a log shows where a run is:

    [fmnist_b4inc2/er/seed0] experience 2/4 epoch 5/5: 63 steps, loss 0.1862, 153618 samples/s, 0.03 s
    [fmnist_b4inc2/er/seed0] experience 2/4: accuracy on seen classes 0.9113

``progress: false`` prints nothing. ``log.jsonl`` is written either way (per-epoch mean loss terms).
Runs of a local or Ray sweep print no lines when piped (the sweep prints one per finished run;
:data:`PIPED_LINES` is switched off around them); SLURM tasks, one run per log file, do.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm


PIPED_LINES = True  # one line per epoch when the stream is not a terminal


class Progress:
    """Progress of one run over ``n_experiences`` (see the module docstring)."""

    def __init__(self, name: str, n_experiences: int, enabled: bool, start: int = 0, stream: TextIO | None = None) -> None:
        self.name, self.n = name, n_experiences
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and _isatty(self.stream)
        self.exp_bar = tqdm(total=n_experiences, initial=start, desc=name, file=self.stream, position=0) if self.live else None
        self.batch_bar: Any = None
        self.experience = start
        self._epoch_start = 0.0
        self._samples = 0
        self._loss_sum, self._steps = 0.0, 0

    def start_epoch(self, experience: int, epoch: int, epochs: int, steps: int | None) -> None:
        """An epoch of ``steps`` batches (None: not known) begins."""
        self.experience, self.epoch, self.epochs = experience, epoch, epochs
        self._epoch_start, self._samples, self._loss_sum, self._steps = time.perf_counter(), 0, 0.0, 0
        if self.live:
            desc = f"exp {experience + 1}/{self.n} epoch {epoch + 1}/{epochs}"
            self.batch_bar = tqdm(total=steps, desc=desc, file=self.stream, position=1, leave=False, unit="batch")

    def step(self, samples: int, terms: dict[str, float]) -> None:
        """One optimiser step on ``samples`` samples; ``terms`` are its loss terms (summed for display)."""
        self._samples += samples
        self._steps += 1
        self._loss_sum += sum(terms.values())
        if self.batch_bar is not None:
            self.batch_bar.update(1)
            if self._steps % 10 == 1 or self._steps == self.batch_bar.total:
                self.batch_bar.set_postfix(loss=f"{self._loss_sum / self._steps:.4f}", samples_s=f"{self._rate():.0f}", refresh=False)

    def end_epoch(self) -> None:
        if self.batch_bar is not None:
            self.batch_bar.close()
            self.batch_bar = None
        elif self.enabled and PIPED_LINES and self._steps:
            seconds = time.perf_counter() - self._epoch_start
            self._line(f"experience {self.experience + 1}/{self.n} epoch {self.epoch + 1}/{self.epochs}: {self._steps} steps, "
                       f"loss {self._loss_sum / self._steps:.4f}, {self._rate():.0f} samples/s, {seconds:.2f} s")

    def end_experience(self, experience: int, seen_acc: float) -> None:
        if self.exp_bar is not None:
            self.exp_bar.update(1)
            self.exp_bar.set_postfix(acc=f"{seen_acc:.3f}")
        elif self.enabled and PIPED_LINES:
            self._line(f"experience {experience + 1}/{self.n}: accuracy on seen classes {seen_acc:.4f}")

    def close(self) -> None:
        for bar in (self.batch_bar, self.exp_bar):
            if bar is not None:
                bar.close()
        self.batch_bar = self.exp_bar = None

    def _rate(self) -> float:
        return self._samples / max(time.perf_counter() - self._epoch_start, 1e-9)

    def _line(self, text: str) -> None:
        print(f"[{self.name}] {text}", file=self.stream, flush=True)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
