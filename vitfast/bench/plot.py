"""The result plot: throughput against batch size, one panel per model, one line per implementation and mode."""
from __future__ import annotations

from pathlib import Path

from .options import IMPLEMENTATIONS
from .results import MODE_INFERENCE, MODE_TRAIN, result_stem, row_mode


def write_plot(record: dict, out: Path) -> Path:
    """Throughput against batch size, one panel per model, one line per implementation and mode.

    Training steps (forward + backward) are dashed lines labelled "train".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in record["rows"]))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(max(6, 5 * len(models)), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for mode in (MODE_INFERENCE, MODE_TRAIN):
            for impl in IMPLEMENTATIONS:
                ok = [r for r in record["rows"] if r["model"] == model and r["implementation"] == impl
                      and row_mode(r) == mode and r["status"] == "ok"]
                if ok:
                    pts = sorted((r["batch"], r["images_per_s"]) for r in ok)
                    ax.plot(*zip(*pts), marker="o", linestyle="--" if mode == MODE_TRAIN else "-",
                            label=ok[0]["label"] + (" train" if mode == MODE_TRAIN else ""))
        batches = sorted({r["batch"] for r in record["rows"] if r["model"] == model})
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_ylim(bottom=0)
        ax.set(xlabel="batch", ylabel="images/s", title=f"{model} ({record['dtype']}, {record['img_size']} px)")
        if ax.lines:
            ax.legend(fontsize=8)
    kind = "CPU figures, harness smoke only" if record["device_kind"] == "cpu" else record["gpu"]
    fig.suptitle(f"vitfast bench: {kind}, {record['date']}", fontsize=10)
    fig.tight_layout()
    path = (out / result_stem(record)).with_suffix(".png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
