"""Figures for reports: matplotlib on the Agg backend (no display on cluster nodes), PNG bytes out."""
from __future__ import annotations

import io


def pyplot():
    """matplotlib.pyplot, imported on first use with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, dpi: int = 100, tight: bool = True) -> bytes:
    """The figure as PNG bytes; closes it."""
    if tight:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()
