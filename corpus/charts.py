"""Small PNG charts for Dagster metadata and lake versions: matplotlib's Agg canvas, no pyplot state.

Library code never calls `matplotlib.use` or pyplot, so a caller's backend (a notebook's, say) is left
alone, and the PNG has no version string in it: the same input gives the same bytes.
"""

from __future__ import annotations

import io
from typing import Any


def new_chart(width: float = 4.8, height: float = 2.4) -> tuple[Any, Any]:
    """A (figure, axes) pair of width x height inches at 100 dpi, drawn on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def png_bytes(fig: Any) -> bytes:
    """The figure, laid out tightly, as PNG bytes without metadata that varies by matplotlib version."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
