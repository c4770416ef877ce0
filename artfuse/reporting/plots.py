"""PNG plots: training curves, confusion matrices, and a tuning search's metric against each parameter."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")  # no display anywhere artfuse runs
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_history(history: list[dict], path: str | Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax_loss.set(title="training loss", xlabel="epoch")
    ax_val.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="val accuracy")
    ax_val.plot(epochs, [h["val_macro_f1"] for h in history], marker="o", label="val macro-F1")
    ax_val.set(title="validation", xlabel="epoch", ylim=(0, 1))
    ax_val.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(summary: dict, title: str, path: str | Path | BinaryIO) -> None:
    confusion = np.asarray(summary["confusion"])
    labels = summary["labels"]
    size = max(4, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(j, i, str(count), ha="center", va="center", color="black")
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title=f"{title}: accuracy {summary['accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f}",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_metric_by_param(rows: list[dict], params: list[str], metric: str, path: str | Path) -> None:
    cols = max(1, min(4, len(params)))
    nrows = max(1, -(-len(params) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, param in zip(axes.flat, params, strict=False):
        xs = [r.get(param) for r in rows]
        ys = [r.get(metric) for r in rows]
        if all(isinstance(x, (int, float)) for x in xs):
            ax.scatter(xs, ys)
            if all(x > 0 for x in xs) and max(xs) / max(min(xs), 1e-12) > 20:
                ax.set_xscale("log")
        else:
            categories = sorted({str(x) for x in xs})
            ax.scatter([categories.index(str(x)) for x in xs], ys)
            ax.set_xticks(range(len(categories)), categories, rotation=30)
        ax.set(xlabel=param, ylabel=metric)
    for ax in list(axes.flat)[len(params) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
