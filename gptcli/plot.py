"""The book's loss plot (chapter 5, figure 5.12): training and validation loss against steps, with
tokens seen on a second x axis. matplotlib is imported only here, and only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path


def plot_losses(evals: list[dict], path: Path) -> Path:
    """Draw ``eval`` events ({step, tokens_seen, train_loss, val_loss}) to a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    from gptcli.files import atomic_write

    steps = [e["step"] for e in evals]
    fig = Figure(figsize=(5, 3), dpi=120)
    ax = fig.add_subplot()
    ax.plot(steps, [e["train_loss"] for e in evals], label="Training loss")
    ax.plot(steps, [e["val_loss"] for e in evals], linestyle="-.", label="Validation loss")
    ax.set_xlabel("Steps")
    ax.set_ylabel("Loss")
    ax.legend(loc="upper right")
    top = ax.twiny()  # tokens seen, aligned with the steps
    top.plot([e["tokens_seen"] for e in evals], [e["train_loss"] for e in evals], alpha=0)
    top.set_xlabel("Tokens seen")
    from matplotlib.ticker import EngFormatter, MaxNLocator

    top.xaxis.set_major_locator(MaxNLocator(5))
    top.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1.2M: labels that do not run together
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
