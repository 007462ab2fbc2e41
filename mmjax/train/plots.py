"""The loss-curve PNG written into the workdir at the end of a run.

Drawn on a `matplotlib.figure.Figure` with its own Agg canvas: no pyplot state and no
`matplotlib.use`, so training inside a notebook never changes the user's plotting backend.
"""

from __future__ import annotations

import os
from typing import Any, Sequence


def plot_loss_curve(records: Sequence[dict[str, Any]], path: str, title: str = "") -> str | None:
    """Train loss per step and, where present, validation loss; returns the path (None: no data)."""
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(path))))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
