"""Training records: ``train_log.jsonl`` (and optional TensorBoard scalars) on rank 0, plus a history."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from ..core.errors import LtclipError

LOG_FILE = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"

log = logging.getLogger(__name__)


class TrainLog:
    """Appends one JSON line per record; :meth:`start` drops the lines a resumed run will write again."""

    def __init__(self, out: Path | None, *, tensorboard: bool = False, on_record: Callable[[dict], None] | None = None):
        self.path = out / LOG_FILE if out is not None else None
        self.on_record = on_record
        self.history: list[dict] = []
        self.writer = None
        self.tensorboard_dir = None
        if tensorboard and out is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise LtclipError("--tensorboard needs the tensorboard package: pip install 'ltclip[tensorboard]'") from None
            self.tensorboard_dir = out / TENSORBOARD_DIR

    def start(self, step: int) -> None:
        """Keep the records up to ``step`` (where a resumed run continues) and drop later ones."""
        if self.tensorboard_dir is not None and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides what a killed run logged after ``step`` (it is logged again)
            self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=step + 1 if step else None)
        if self.path is None or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.history = [json.loads(line) for line in kept]

    def record(self, record: dict) -> None:
        self.history.append(record)
        if self.on_record is not None:
            self.on_record(dict(record))
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("val_", "val/"), value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
