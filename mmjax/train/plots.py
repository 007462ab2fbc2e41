"""The loss-curve PNG written into the workdir at the end of a run."""

from __future__ import annotations

import os
from typing import Any, Sequence


def plot_loss_curve(records: Sequence[dict[str, Any]], path: str, title: str = "") -> str | None:
    """Train loss per step and, where present, validation loss; returns the path (None: no data)."""
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(path))))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
