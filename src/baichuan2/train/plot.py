"""`baichuan2 plot`: training curves from one or more runs' metrics.jsonl to PNG."""

from __future__ import annotations

from pathlib import Path

from baichuan2.utils.metrics import read_metrics


def plot_runs(runs: list[str], out: str, keys: tuple[str, ...] = ("loss", "lr", "grad_norm", "tokens_per_s"),
              smooth: int = 1, x_axis: str = "step") -> Path:
    """One panel per metric, one line per run; ``smooth`` is a moving-average window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from baichuan2.utils.io import atomic_open

    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.6 * len(keys)), sharex=True, squeeze=False)
    for run in runs:
        path = Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run)
        records = [r for r in read_metrics(path) if "event" not in r]
        label = path.parent.name
        for ax, key in zip(axes[:, 0], keys):
            ys = [float(r[key]) for r in records if isinstance(r.get(key), (int, float))]
            xs = [r["step"] if x_axis == "step" else r.get("tokens", r["step"])
                  for r in records if isinstance(r.get(key), (int, float))]
            if not ys:
                continue
            if smooth > 1:
                ys = [sum(ys[max(0, i - smooth + 1):i + 1]) / len(ys[max(0, i - smooth + 1):i + 1])
                      for i in range(len(ys))]
            ax.plot(xs, ys, label=label)
            ax.set_ylabel(key)
            if key in ("loss", "val_loss"):
                val = [(r["step"] if x_axis == "step" else r.get("tokens", r["step"]), r["val_loss"])
                       for r in records if isinstance(r.get("val_loss"), (int, float))]
                if val and key == "loss":
                    ax.plot(*zip(*val), "o--", label=f"{label} (validation)")
    axes[-1, 0].set_xlabel(x_axis)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    out_path = Path(out)
    with atomic_open(out_path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return out_path


def plot(runs: str | list[str], out: str = "loss.png", metrics: str | list[str] = "loss,lr,grad_norm,tokens_per_s",
         smooth: int = 1, x_axis: str = "step") -> None:
    """Draw training curves (loss, LR, gradient norm, throughput...) of one or more runs to a PNG.

    Args:
        runs: a run directory (or metrics.jsonl), or a list of them '[runs/a, runs/b]' to compare.
        out: output PNG path.
        metrics: comma-separated metric names from metrics.jsonl (e.g. loss,z_loss,mfu,val_loss).
        smooth: moving-average window in logged points.
        x_axis: step or tokens.
    """
    runs = [runs] if isinstance(runs, str) else runs
    keys = tuple(metrics.split(",")) if isinstance(metrics, str) else tuple(metrics)
    print(plot_runs(runs, out, keys, smooth, x_axis))


COMMANDS = plot
