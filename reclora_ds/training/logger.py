"""Metric loggers: one protocol, a TensorBoard writer that exists on rank 0 only, a no-op elsewhere.

Every rank calls the same logging methods at the same steps; :func:`build_logger` hands rank 0 a
:class:`TensorBoardLogger` and every other rank a :class:`NullLogger`, so training code never branches on
the rank to log and no rank but 0 creates an event file.

Metric names carry their group: ``train/loss``, ``train/lr``, ``eval/auc``, ``eval/logloss``,
``eval/gauc``, ``perf/samples_per_s``, ``perf/data_share``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from reclora_ds.distributed import is_main_process


@runtime_checkable
class MetricLogger(Protocol):
    """What the recipes log through."""

    def log(self, name: str, value: float, step: int) -> None:
        """One scalar ``name`` at ``step``."""

    def log_dict(self, values: Mapping[str, float], step: int) -> None:
        """Several scalars at the same step."""

    def log_text(self, name: str, text: str, step: int = 0) -> None:
        """A text record (e.g. the resolved config)."""

    def close(self) -> None:
        """Flush and release the writer."""


class NullLogger:
    """A :class:`MetricLogger` that drops everything (ranks other than 0, or logging disabled)."""

    def log(self, name: str, value: float, step: int) -> None:
        pass

    def log_dict(self, values: Mapping[str, float], step: int) -> None:
        pass

    def log_text(self, name: str, text: str, step: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """A :class:`MetricLogger` writing one TensorBoard event file into ``log_dir``.

    Args:
        log_dir: the event-file folder (created).
        purge_step: on a resumed run, the step it resumes from: TensorBoard hides the events of the
            killed run at or after it, so the curves show each step once.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log(self, name: str, value: float, step: int) -> None:
        self._writer.add_scalar(name, float(value), global_step=step)

    def log_dict(self, values: Mapping[str, float], step: int) -> None:
        for name, value in values.items():
            self.log(name, value, step)

    def log_text(self, name: str, text: str, step: int = 0) -> None:
        self._writer.add_text(name, text, global_step=step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def build_logger(log_dir: str | Path, purge_step: int | None = None, enabled: bool = True) -> MetricLogger:
    """A :class:`TensorBoardLogger` on rank 0 (when ``enabled``), a :class:`NullLogger` on every other rank."""
    if enabled and is_main_process():
        return TensorBoardLogger(log_dir, purge_step=purge_step)
    return NullLogger()
