"""Training curves as PNG bytes, for MLflow artefacts."""

from __future__ import annotations

import io


def curve_png(history: list[dict], keys: list[str], x_key: str, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for key in keys if history and key in history[0]]
    figure, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3), squeeze=False)
    for axis, key in zip(axes[0], keys):
        axis.plot([row[x_key] for row in history], [row[key] for row in history])
        axis.set_title(key)
        axis.set_xlabel(x_key)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()
