"""PNG plots: training curves, confusion matrices, a tuning search's metric against each parameter, calibration
(reliability, risk-coverage) and the run report's score histograms and label shares."""

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


def plot_reliability(curves: dict, summary: dict, task: str, path: str | Path) -> None:
    """Accuracy against mean confidence per confidence bin, raw softmax and calibrated, beside the diagonal."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    styles = {"uncalibrated": ("tab:orange", "ece_uncalibrated"), "calibrated": ("tab:blue", "ece")}
    for name, (color, ece) in styles.items():
        filled = [b for b in curves[name] if b["count"]]
        sizes = [20 + 200 * b["count"] / max(sum(f["count"] for f in filled), 1) for b in filled]
        ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], color=color, linewidth=1)
        ax.scatter(
            [b["confidence"] for b in filled],
            [b["accuracy"] for b in filled],
            s=sizes,
            color=color,
            label=f"{name} (ECE {summary[ece]:.3f})",
        )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="mean top score in the bin",
        ylabel="accuracy in the bin",
        title=f"{task}: reliability, temperature {summary['temperature']:.2f}",
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_risk_coverage(points: list[dict], auto_accept: dict, task: str, path: str | Path) -> None:
    """Accuracy of the predictions accepted against the share accepted, as the score threshold falls."""
    covered = [p for p in points if p["coverage"] > 0]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step([p["coverage"] for p in covered], [p["accuracy"] for p in covered], where="post", color="tab:blue")
    if auto_accept["threshold"] is not None and auto_accept["accuracy"] is not None:
        ax.scatter([auto_accept["coverage"]], [auto_accept["accuracy"]], color="tab:red", zorder=3)
        ax.annotate(
            f"review threshold {auto_accept['threshold']:.3f}: {auto_accept['coverage']:.0%} accepted, "
            f"{auto_accept['accuracy']:.3f} right",
            (auto_accept["coverage"], auto_accept["accuracy"]),
            textcoords="offset points",
            xytext=(-10, -18),
            ha="right",
            fontsize=8,
        )
    ax.set(
        xlim=(0, 1.02),
        xlabel="share of predictions accepted (score at or above a threshold)",
        ylabel="accuracy of the accepted",
        title=f"{task}: risk-coverage",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_score_histogram(
    scores: np.ndarray, earlier: np.ndarray, threshold: float | None, task: str, path: str | Path | BinaryIO
) -> None:
    """This run's top scores (counts) over the earlier runs' (share, as a line), and the review threshold."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    bins = np.linspace(0, 1, 21)
    ax.hist(scores, bins=bins, color="tab:blue", alpha=0.8, label=f"this run ({len(scores)})")
    if len(earlier) and len(scores):
        counts, _ = np.histogram(earlier, bins=bins)
        ax.step(bins[:-1], counts / counts.sum() * len(scores), where="post", color="black", linewidth=1,
                label=f"earlier runs ({len(earlier)}), same total")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"review below {threshold:.2f}")
    ax.set(xlim=(0, 1), xlabel=f"{task} score", ylabel="rows", title=f"{task}: top score")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)


def plot_label_shift(rows: list[dict], task: str, path: str | Path | BinaryIO) -> None:
    """Each label's share of this run beside its share of all earlier runs (rows: label, share, earlier_share)."""
    fig, ax = plt.subplots(figsize=(5.5, max(2.0, 0.28 * len(rows) + 1.2)))
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r["share"] for r in rows], height=0.4, color="tab:blue", label="this run")
    ax.barh(y + 0.2, [r["earlier_share"] for r in rows], height=0.4, color="tab:grey", label="earlier runs")
    ax.set_yticks(y, [r["label"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="share of labelled rows", title=f"{task}: labels")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
