"""One PNG per op: bars of % of the measured ceiling per shape, one colour per impl."""
from __future__ import annotations

import os

from .harness import statistic


def plot_op(records, op, meta, path):
    """Write `path` for the records of `op`; shapes with no timed impl show 'not timed'."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if r["op"] == op]
    groups = list(dict.fromkeys(f"{r['shape_str']}\n{r['dtype']}" for r in recs))
    impls = list(dict.fromkeys(r["impl"] for r in recs if r["status"] == "OK")) or ["(none)"]
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) + 2), 4.8))
    colours = plt.get_cmap("tab10")
    labelled = set()
    for j, impl in enumerate(impls):
        for i, g in enumerate(groups):
            r = next((r for r in recs if r["impl"] == impl and f"{r['shape_str']}\n{r['dtype']}" == g), None)
            if not r or r["status"] != "OK":
                continue
            x = i - 0.4 + (j + 0.5) * width
            pct = r["pct_ceiling"] or 0.0
            ax.bar(x, pct, width, color=colours(j % 10), label=None if impl in labelled else impl)
            labelled.add(impl)
            ax.text(x, pct, f"{r['ms']:.3g} ms", ha="center", va="bottom", fontsize=6, rotation=90)
    for i, g in enumerate(groups):
        if not any(r["status"] == "OK" and f"{r['shape_str']}\n{r['dtype']}" == g for r in recs):
            ax.text(i, 1, "not timed", ha="center", va="bottom", fontsize=8, color="grey")
    metric = recs[0]["metric"] if recs else ""
    ceiling = "copy bandwidth (read+write)" if metric == "GB/s" else "matmul rate of the dtype"
    ax.set_xticks(range(len(groups)), groups, fontsize=7)
    ax.set_ylabel(f"% of measured {ceiling}")
    dims = "×".join(recs[0]["shape"].keys()) if recs else ""
    ax.set_xlabel(f"shape ({dims}) and dtype\nbar labels: ms, {statistic(recs)}", fontsize=9)
    ax.set_title(f"{op} — {meta.get('device', '?')} — {meta.get('date', '')[:10]}", fontsize=10)
    ax.set_ylim(0, max([105.0] + [(r["pct_ceiling"] or 0) * 1.15 for r in recs if r["status"] == "OK"]))
    if any(r["status"] == "OK" for r in recs):
        ax.legend(fontsize=7, loc="upper left", ncol=min(len(impls), 6))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(records, meta, outdir):
    """One PNG per op in `outdir`; returns their paths."""
    ops = list(dict.fromkeys(r["op"] for r in records))
    return [plot_op(records, op, meta, os.path.join(outdir, f"{op}.png")) for op in ops]
