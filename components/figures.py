"""Saving figures and the command line shared by the modules that draw them (evaluation, GRPO curves and outcomes,
benches): one place for the PNG settings, so every plot of a run looks the same."""
from __future__ import annotations

import sys
from pathlib import Path


def figure_main(argv: list[str], usage: str, plot) -> int:
    """A figure module's command line: `plot(Path(IN), Path(OUT_PNG), TITLE or "")`, the PNG path printed."""
    if len(argv) not in (2, 3):
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    print(plot(Path(argv[0]), Path(argv[1]), argv[2] if len(argv) == 3 else ""))
    return 0


def save_figure(fig, path: Path, title: str = "") -> Path:
    """Title, tight layout, 120 dpi PNG, and the figure closed (plots are made in loops of long runs)."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
