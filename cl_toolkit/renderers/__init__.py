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
`cl_toolkit.renderers.retention` (``retention``).
"""
from __future__ import annotations


def legend_outside(ax, fontsize: int = 7) -> None:
    """The axes' legend to their right, never over the data (a figure saved with
    ``bbox_inches="tight"`` grows to hold it); nothing when no artist has a label."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0, frameon=False)
