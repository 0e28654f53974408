"""One PNG per benchmark family: rlkern's speedup over each peer, and peak memory against N.

Left panel: for every timed bench of the family, the peer's median over rlkern's (log scale;
right of 1: rlkern is faster). Right panel (when the family measured it, the two log-prob
families): peak memory of one fwd+bwd beyond the inputs against N, rlkern vs materialized logits.
"""

from __future__ import annotations

import os
import textwrap

from rlkern.benches.common import Row


def speedups(family: str, results: list[tuple[str, list[Row]]]) -> list[tuple[str, float]]:
    """(label "bench [run]: peer", peer median / rlkern median) for every timed peer row; the
    run's name is shown when it is a variant (policy_loss_bf16, ...)."""
    out = []
    for name, rows in results:
        suffix = "" if name == family else f" [{name.removeprefix(family + '_')}]"
        for r in rows:
            if r.speedup is not None and not r.impl.startswith("rlkern"):
                out.append((f"{r.bench}{suffix}: {r.impl}", r.speedup))
    return out


def memory_curves(results: list[tuple[str, list[Row]]]) -> dict[str, list[tuple[int, float]]]:
    """impl -> [(N, peak MiB)] from the memory-sweep rows (``extra["n"]``)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for _, rows in results:
        for r in rows:
            if "n" in r.extra and r.peak_mem_mib is not None:
                curves.setdefault(r.impl, []).append((r.extra["n"], r.peak_mem_mib))
    return {impl: sorted(points) for impl, points in curves.items()}


def plot_family(family: str, results: list[tuple[str, list[Row]]], path: str, device: str) -> str | None:
    """Write the family's PNG to ``path``; None when matplotlib is not installed."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bars, curves = speedups(family, results), memory_curves(results)
    panels = 1 + bool(curves)
    fig, axes = plt.subplots(1, panels, figsize=(10 + 6 * (panels - 1), 1.5 + 0.45 * max(len(bars), 4)),
                             squeeze=False, gridspec_kw={"width_ratios": [10, 6][:panels]})
    ax = axes[0][0]
    if bars:
        labels, values = zip(*bars)
        labels = ["\n".join(textwrap.wrap(label, 60)) for label in labels]
        y = range(len(bars))
        ax.barh(y, values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        lo, hi = min(min(values), 1.0) / 1.3, max(max(values), 1.0) * 1.6
        ax.set_xlim(lo, hi)
        ax.set_xticks([t for t in (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if lo <= t <= hi])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axvline(1.0, color="black", linewidth=0.8)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no peer ran", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("peer time / rlkern time (>1: rlkern faster)")
    ax.set_title(f"{family}: speedup vs each peer", fontsize=9)
    if curves:
        ax = axes[0][1]
        for impl, points in curves.items():
            ns, mib = zip(*points)
            ax.plot(ns, mib, marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel("peak MiB beyond the inputs (fwd+bwd)")
        ax.set_title(f"{family}: peak memory vs N", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(device, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
