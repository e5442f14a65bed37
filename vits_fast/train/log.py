"""The run log of :mod:`vits_fast.train`: ``train_log.jsonl`` and, where installed, TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional

import torch


class RunLog:
    """Every logged scalar of a run as one JSON line of ``path`` (``train_log.jsonl``), mirrored to TensorBoard
    (``tensorboard/`` beside it) when ``tensorboard`` is installed; ``path`` None (ranks other than 0) logs nothing."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        self._tb = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(path.parent / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL only
                self._tb = None

    def write(self, record: Dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def audio(self, tag: str, wav: torch.Tensor, sample_rate: int, step: int) -> None:
        if self._tb is not None:
            self._tb.add_audio(tag, wav.reshape(1, -1), step, sample_rate=sample_rate)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
