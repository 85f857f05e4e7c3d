"""PNG figures of calibration results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True))


def search_curve(trajectory: dict, path: str | Path) -> Path:
    """Loss after each greedy step against the number of S layers, flipped layers annotated."""
    plt = _plt()
    steps = trajectory["steps"]
    n = trajectory["num_layers"]
    xs = [0] + [s["pattern"].count("S") for s in steps]
    ys = [trajectory["base_loss"]] + [s["loss"] for s in steps]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(xs, ys, marker="o", ms=3)
    for x, y, s in zip(xs[1:], ys[1:], steps, strict=True):
        ax.annotate(
            ",".join(map(str, s["flipped"])),
            (x, y),
            fontsize=7,
            xytext=(2, 4),
            textcoords="offset points",
        )
    ax.set_xlabel(f"shared (S) layers of {n}")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel("calibration LM loss (nats/token)")
    ax.set_title(f"greedy IndexCache search -> {trajectory['pattern']}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def overlap_heatmap(overlap: dict, path: str | Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(overlap["overlap"], vmin=0, vmax=1, cmap="viridis", origin="upper")
    fig.colorbar(im, ax=ax, label=f"mean |T_i ∩ T_j| / {overlap['index_topk']}")
    ax.set_xlabel("layer j")
    ax.set_ylabel("layer i")
    _integer_ticks(ax.xaxis, ax.yaxis)
    adj = overlap.get("adjacent_mean")
    ax.set_title(
        f"top-k overlap ({overlap['rows']} queries"
        + (f", adjacent mean {adj:.2f})" if adj is not None else ")"),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def distill_curve(history: list[dict], path: str | Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_xlabel("step")
    ax.set_ylabel("indexer KL loss (mean over F layers)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
