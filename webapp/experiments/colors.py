"""One colour per run, the same on every chart of every page: the run page's charts, the
compare page's curves, scatter and parallel coordinates, and the swatch beside a run's name
in the tables (sweep page, compare page).

The colour is the run's id taken modulo the palette (the plainest hash): it needs no stored
field, every page computes it alike, and the consecutive ids of one sweep's runs get
different colours, up to the palette's twelve. The pages' scripts never choose a colour: the
server puts each run's in the data it hands them.
"""

RUN_COLORS = (
    "#3b5bdb", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#0b7285",
    "#e67700", "#5c940d", "#862e9c", "#1864ab", "#a61e4d", "#087f5b",
)  # fmt: skip


def run_color(run_id: int) -> str:
    return RUN_COLORS[run_id % len(RUN_COLORS)]
