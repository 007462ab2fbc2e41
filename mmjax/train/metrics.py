"""Where metrics go: a JSONL file, TensorBoard event files and a tqdm progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm


class MetricsWriter:
    """Appends `{"step": s, **metrics}` lines to `metrics.jsonl` and scalars to TensorBoard.

    A file whose last line was cut (a process killed mid-write, a full disk) gets a newline
    first, so the appended records start on a clean line; `read_metrics` skips the cut one."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            _end_on_newline(self.path)
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        record = {"step": int(step), "time": round(time.time(), 3), **scalars}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))

    def write_text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _end_on_newline(path: str) -> None:
    try:
        with open(path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    except FileNotFoundError:
        pass


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of `workdir/metrics.jsonl` (empty when absent); a line cut mid-write by a
    killed run is skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    out.append(record)
    return out


class Progress:
    """A tqdm bar over steps showing loss and throughput in the task's unit (tok/s, img/s);
    tqdm shows the step rate and the ETA."""

    _SHORT = {"tokens": "tok", "images": "img", "examples": "ex"}

    def __init__(self, start: int, total: int, *, enabled: bool = True, unit: str = "tokens"):
        self._rate_name = f"{self._SHORT.get(unit, unit)}/s"
        self._bar = tqdm(
            total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
            disable=not enabled, file=sys.stderr, smoothing=0.1,
        )
        self._t0 = time.perf_counter()
        self._units = 0

    def update(self, n_steps: int, units: int, **postfix: float) -> None:
        self._units += units
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        shown = {k: f"{v:.4g}" for k, v in postfix.items()}
        shown[self._rate_name] = f"{self._units / elapsed:,.0f}"
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n_steps)

    def set_total(self, total: int) -> None:
        self._bar.total = total
        self._bar.refresh()

    def write(self, line: str) -> None:
        self._bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return not isinstance(v, (str, bytes, dict, list, tuple))
    except (TypeError, ValueError):
        return False
