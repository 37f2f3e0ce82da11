"""Perplexity-vs-sparsity plots from the results tables the benchmarks write (matplotlib PNG).

`benchmarks/smollm2.py` calls `plot_perplexity` after every run set; this script redraws the
plots of tables already in docs/results without re-running anything:

    python benchmarks/plots.py docs/results/smollm2.md docs/results/convex.md docs/results/structured.md
"""

from __future__ import annotations

import os
import sys


def read_rows(path: str) -> list[dict]:
    """The rows of a results table (columns method, sparsity, ..., perplexity) as dicts."""
    rows, header = [], None
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.startswith("|"):
                header = None if not line.strip() else header
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] == "method":
                header = cells
            elif header and not set(cells[0]) <= {"-"}:
                rows.append(dict(zip(header, cells)))
    return [{"method": r["method"], "pattern": r["sparsity"], "ppl": float(r["perplexity"])} for r in rows
            if "perplexity" in r and "sparsity" in r]


def _level(pattern: str) -> tuple[float | None, str]:
    """'50%' -> (0.5, ''), 'structured 20%' -> (0.2, ''), '2:4' -> (0.5, '2:4'), '-' -> (None, '')."""
    text = pattern.replace("structured", "").strip()
    if ":" in text:
        n, m = (int(x) for x in text.split(":"))
        return 1 - n / m, text
    if text.endswith("%"):
        return float(text[:-1]) / 100, ""
    return None, ""


def plot_perplexity(rows: list[dict], path: str, title: str = "SmolLM2-135M") -> str:
    """One line per method (perplexity against sparsity, log scale); N:M runs as separate markers;
    the dense model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    methods = sorted({row["method"] for row in rows if row["method"] != "dense"})
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {method: palette[i % len(palette)] for i, method in enumerate(methods)}
    dense = [row["ppl"] for row in rows if row["method"] == "dense"]
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        level, nm = _level(row["pattern"])
        if row["method"] == "dense" or level is None:
            continue
        if nm:
            ax.scatter([level], [row["ppl"]], marker="x", zorder=3, color=color[row["method"]])
            ax.annotate(f"{row['method']} {nm}", (level, row["ppl"]), fontsize=7, xytext=(4, 0), textcoords="offset points")
        else:
            lines.setdefault(row["method"], []).append((level, row["ppl"]))
    for method, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method, color=color[method])
    if dense:
        ax.axhline(dense[0], linestyle="--", color="gray", label=f"dense ({dense[0]:.2f})")
    structured = any("structured" in row["pattern"] for row in rows)
    ax.set(xlabel="fraction of decoder-layer parameters removed" if structured else "sparsity",
           ylabel="perplexity (log scale)", yscale="log", title=title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(paths: list[str]) -> None:
    for path in paths:
        image = os.path.splitext(path)[0] + "-ppl.png"
        plot_perplexity(read_rows(path), image, title=f"SmolLM2-135M: {os.path.basename(path)}")
        print(image)


if __name__ == "__main__":
    main(sys.argv[1:])
