"""Small plots the tracking layer makes itself (physics plots live in uhg.eval.plots)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def loss_curve_figure(histories: Mapping[str, Sequence[tuple[int, float]]]) -> Any:
    """One panel of loss curves against optimizer step; one line per metric.

    histories: metric name -> [(step, value), ...]. Returns a matplotlib Figure (Agg backend,
    so it works on headless workers); the caller closes it.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, points in sorted(histories.items()):
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, label=name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if histories:
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure
