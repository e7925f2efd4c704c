"""Draws docs/concepts.png, the figure of docs/concepts.md: `python docs/concepts_figure.py`.

A diagram, not a measurement: a parameter server next to p2prl's all-reduce among peers, and below
them one PPO iteration of two peers, whose collectives line up one for one; the finished episodes ride
in the first sum, so every peer decides alike whether the target is reached.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).resolve().parent / "concepts.png"
PEER, SERVER, COLLECTIVE, LOCAL = "#dbe9f6", "#f6dbdb", "#fde9c4", "#e4f2df"


def box(ax, x: float, y: float, w: float, h: float, text: str, color: str, size: float = 9, pad: float = 0.02) -> None:
    """A rounded box of outer size (w + 2 pad) x (h + 2 pad) centred on (x, y)."""
    ax.add_patch(FancyBboxPatch((x - w / 2 + pad, y - h / 2 + pad), w - 2 * pad, h - 2 * pad,
                                boxstyle=f"round,pad={pad}", fc=color, ec="#444"))
    ax.text(x, y, text, ha="center", va="center", fontsize=size)


def arrow(ax, a: tuple, b: tuple, both: bool = False, color: str = "#444") -> None:
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="<|-|>" if both else "-|>", mutation_scale=10, color=color,
                                 lw=1.2, shrinkA=2, shrinkB=2))


def parameter_server(ax) -> None:
    ax.set_title("parameter server (comm=param_server: the baseline)", fontsize=10)
    box(ax, 0.5, 0.8, 0.4, 0.18, "rank 0: the server (samples too)\nsums the gradients, steps,\nsends the parameters back",
        SERVER, 8)
    for i, x in enumerate((0.17, 0.5, 0.83)):
        box(ax, x, 0.22, 0.3, 0.18, f"rank {i + 1}\nenvs + model", PEER, 8)
        arrow(ax, (x - 0.03, 0.3), (0.5 - 0.06 + 0.06 * i, 0.72), color="#a33")
        arrow(ax, (0.5 - 0.03 + 0.06 * i, 0.72), (x + 0.03, 0.3), color="#36a")
    ax.text(0.5, 0.5, "gradients up (red), parameters down (blue):\nevery update passes through one process",
            ha="center", va="center", fontsize=8, color="#333", bbox=dict(fc="white", ec="none", alpha=0.8))


def all_reduce(ax) -> None:
    ax.set_title("p2prl (comm=allreduce: the default)", fontsize=10)
    spots = {0: (0.2, 0.8), 1: (0.8, 0.8), 2: (0.8, 0.22), 3: (0.2, 0.22)}
    for r, (x, y) in spots.items():
        box(ax, x, y, 0.34, 0.18, f"peer {r}: own envs,\nfull model, optimizer", PEER, 8)
    for r in range(4):
        (x0, y0), (x1, y1) = spots[r], spots[(r + 1) % 4]
        if y0 == y1:
            arrow(ax, (min(x0, x1) + 0.16, y0), (max(x0, x1) - 0.16, y0), both=True)
        else:
            arrow(ax, (x0, max(y0, y1) - 0.08), (x0, min(y0, y1) + 0.08), both=True)
    ax.text(0.5, 0.51, "one all-reduce per update:\nevery peer gets the mean gradient\nand takes the same step",
            ha="center", va="center", fontsize=8, color="#333")


def iteration(ax) -> None:
    ax.set_title("one iteration on two peers: each alone in between, the same collectives in the same order",
                 fontsize=10)
    steps = [("sample\nown envs", LOCAL, 1.5), ("sum stats\n+ episodes", COLLECTIVE, 1.1),
             ("minibatch\ngradient", LOCAL, 1.3), ("all-reduce\ngradient", COLLECTIVE, 1.0),
             ("same\nstep", LOCAL, 0.8), ("all-reduce\ngradient", COLLECTIVE, 1.0), ("same\nstep", LOCAL, 0.8),
             ("stop? (same\nepisodes, same\nanswer)", LOCAL, 1.2)]
    lanes, stretch, unit = (0.72, 0.28), (1.0, 1.3), 0.085  # peer 1's own work takes longer
    x = [0.09, 0.09]
    for lane, y in enumerate(lanes):
        ax.text(0.0, y, f"peer {lane}", ha="left", va="center", fontsize=9, weight="bold")
    for text, kind, width in steps:
        if kind == COLLECTIVE:
            start, w = max(x), unit * width  # a collective ends when the last peer has joined it
            for lane, y in enumerate(lanes):
                if x[lane] < start:
                    ax.plot([x[lane], start], [y, y], color="#999", lw=1, ls=":")
                box(ax, start + w / 2, y, w * 0.96, 0.26, text, kind, 7, pad=0.01)
            ax.plot([start + w / 2] * 2, [lanes[1] + 0.14, lanes[0] - 0.14], color="#c80", lw=1, ls="--")
            x = [start + w, start + w]
        else:
            for lane, y in enumerate(lanes):
                w = unit * width * stretch[lane]
                box(ax, x[lane] + w / 2, y, w * 0.96, 0.26, text, kind, 7, pad=0.01)
                x[lane] += w
    ax.text(0.5, 0.0, "orange: collectives, where every peer waits for the last (at most comm.timeout_s); "
            "green: each peer alone; dotted: waiting", ha="center", va="bottom", fontsize=8, color="#333")


def main() -> Path:
    fig = Figure(figsize=(10, 7.2), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.35, 1])
    axes = list(top.subplots(1, 2)) + [bottom.subplots()]
    for ax in axes:
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.axis("off")
    parameter_server(axes[0])
    all_reduce(axes[1])
    iteration(axes[2])
    fig.savefig(OUT, dpi=100, metadata={"Software": None})
    return OUT


if __name__ == "__main__":
    print(main())
