"""Line plots for the run folders (matplotlib, headless): fuse.py's sweeps, distill.py's loss curve."""
from __future__ import annotations

from pathlib import Path


def lines(path: Path, xs, series: dict, xlabel: str, ylabel: str, title: str, logx: bool = False,
          bold=("average", "PCA")) -> Path:
    """One line per entry of series ({label: ys over xs}, or {label: (xs, ys)}), saved as a PNG at path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        x, y = ys if isinstance(ys, tuple) else (xs, ys)
        if len(y):  # in x order: --dim 64,32,128 is one line, not a zigzag
            x, y = zip(*sorted(zip(x, y), key=lambda p: p[0]))
        ax.plot(x, y, marker="o" if len(y) < 50 else None, lw=2.5 if name in bold else 1, label=name)
    if logx:  # ticks at the values swept (a log axis labels 3x10^1, 4x10^1 ... for 32, 64)
        ax.set_xscale("log")
        ax.set_xticks(list(xs), [f"{x:g}" for x in xs])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
