"""history.png: loss and accuracy per epoch."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display here or in CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_history(history: list[dict], path: Path, title: str) -> None:
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    loss_ax.plot(epochs, [r["test_loss"] for r in history], marker="o", label="test")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [100 * r["train_accuracy"] for r in history], marker="o", label="train")
    acc_ax.plot(epochs, [100 * r["test_accuracy"] for r in history], marker="o", label="test")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
