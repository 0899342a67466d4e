"""Report renderers: each draws one key of ``results["extras"]`` in `cl_toolkit.report`.

A renderer is a function ``render(runs, out_dir) -> (markdown, html)``: ``runs`` are the
results.json dicts of one report section that hold its key, ``out_dir`` is where it may write
PNG files (referenced from the markdown, embedded in the HTML). It is registered under the
extras key it draws, in the registry kind ``renderer`` (`cl_toolkit.registry.BUILTINS`); a
plugin adds one through the entry-point group ``cl_toolkit.renderers``, e.g.::

    [project.entry-points."cl_toolkit.renderers"]
    my_probe = "my_package.report:render_my_probe"

Each run a renderer gets from the report carries ``r["_row"]``, the name of its row in the
section's table (the row's label, or its id ``R1``, ``R2``, ... where the label is long; the
section's legend table maps ids to settings): name rows and curves by it so they match the
table. A renderer may carry a ``check(extra)`` attribute, a function that raises ValueError (or
TypeError) saying what is wrong with one run's ``results["extras"][key]``: the report calls it on every
run before it writes anything and refuses a malformed run with that reason (exit 2) instead of
failing halfway.

Built-in: `cl_toolkit.renderers.tokens` (``mqar``, ``kv_interference``, ``exact_match``) and
`cl_toolkit.renderers.retention` (``retention``), `cl_toolkit.renderers.segmentation`
(``segmentation_examples``).
"""
from __future__ import annotations

import base64
import io
from pathlib import Path


def legend_outside(ax, fontsize: int = 7) -> None:
    """The axes' legend to their right, never over the data (a figure saved with
    ``bbox_inches="tight"`` grows to hold it); nothing when no artist has a label."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0, frameon=False)


def save_png(fig, out_dir: Path, name: str, wide: bool = False) -> tuple[str, str]:
    """Markdown and html references to ``fig`` saved as ``out_dir/name`` (closed after); the
    html embeds the PNG, so the page stands alone. ``wide``: shown across the page."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    (out_dir / name).write_bytes(buf.getvalue())
    data = base64.b64encode(buf.getvalue()).decode()
    style = ' style="max-width:98%"' if wide else ""
    return (f"![{name}]({name})",
            f'<img alt="{name}"{style} src="data:image/png;base64,{data}">')
