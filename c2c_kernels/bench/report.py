"""Rows out: the terminal table, the JSON file and the PNG plot (time per token count for each
backend, with the roofline bound of the peaks measured in the same run)."""
from __future__ import annotations

import json
import os

ROW_KEYS = ("workload", "backend", "device", "dtype", "layout", "layers", "fusers", "requests", "tokens",
            "total_tokens", "median_ms", "spread_ms", "min_ms", "samples", "first_call_ms", "tflops",
            "gbs", "peak_fraction", "roofline_ms", "speedup", "correct", "max_abs_err", "flops", "bytes",
            "weight_bytes", "error")


def roofline_ms(flops: float, nbytes: float, peak_tflops: float, peak_gbs: float) -> float:
    """The least time the peaks allow: whichever of compute and memory takes longer."""
    return max(flops / (peak_tflops * 1e12), nbytes / (peak_gbs * 1e9)) * 1e3


def _fmt(value, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    header = ("workload", "dtype", "tokens", "backend", "median ms", "IQR ms", "TFLOP/s", "GB/s",
              "% roofline", "vs eager", "check")
    lines = []
    for r in rows:
        tokens = str(r["tokens"]) if r["requests"] == 1 else f'{r["requests"]}x{r["tokens"]}'
        if r["error"]:
            check = "ERROR: " + r["error"].splitlines()[0][:60]
        elif r["correct"] is None:
            check = "not checked"
        else:
            check = ("ok" if r["correct"] else "MISMATCH") + f' ({r["max_abs_err"]:.1e})'
        lines.append((r["workload"], r["dtype"], tokens, r["backend"], _fmt(r["median_ms"], ".3f"),
                      _fmt(r["spread_ms"], ".3f"), _fmt(r["tflops"], ".3g"), _fmt(r["gbs"], ".3g"),
                      _fmt(None if r["peak_fraction"] is None else 100 * r["peak_fraction"], ".1f"),
                      _fmt(r["speedup"], ".2f", "-") + ("x" if r["speedup"] is not None else ""), check))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    right = {4, 5, 6, 7, 8, 9}

    def render(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [render(header).rstrip(), render(["-" * w for w in widths])]
    previous = None
    for r, line in zip(rows, lines):
        group = (r["workload"], r["dtype"], r["tokens"], r["requests"])
        if previous is not None and group != previous:
            out.append("")
        out.append(render(line).rstrip())
        previous = group
    return "\n".join(out)


def write_json(path: str, meta: dict, peaks: dict, rows: list[dict]) -> None:
    """Written whole and renamed into place, so a reader never sees half a file."""
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump({"meta": meta, "peaks": peaks, "rows": rows}, f, indent=1)
        f.write("\n")
    os.replace(partial, path)


def plot(path: str, meta: dict, peaks: dict, rows: list[dict]) -> str | None:
    """Write the PNG; returns why it could not (matplotlib missing, nothing timed) or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot needs matplotlib: pip install 'c2c-kernels[bench]' (or pip install matplotlib)"
    timed = [r for r in rows if r["median_ms"] is not None]
    if not timed:
        return "--plot: no row was timed, nothing to draw"
    panels = list(dict.fromkeys((r["workload"], r["dtype"], r["layout"], r["layers"]) for r in timed))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        workload, dtype, layout, layers = panel
        mine = [r for r in timed if (r["workload"], r["dtype"], r["layout"], r["layers"]) == panel]
        for backend in dict.fromkeys(r["backend"] for r in mine):
            points = sorted((r["total_tokens"], r["median_ms"], r["spread_ms"]) for r in mine
                            if r["backend"] == backend)
            xs, ys, spreads = zip(*points)
            ax.errorbar(xs, ys, yerr=[s / 2 for s in spreads], marker="o", capsize=3, label=backend)
        _draw_roofline(ax, mine, peaks, dtype)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["total_tokens"] for r in mine})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens fused")
        ax.set_ylabel("time per call (ms)")
        ax.set_title(f"{workload}\n{dtype}, {layout}, {layers} layer(s) x K,V", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f'c2c-bench on {meta.get("device_name", meta.get("device"))}, {meta.get("date", "")}',
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _draw_roofline(ax, rows: list[dict], peaks: dict, dtype: str) -> None:
    """The bound as a function of tokens: FLOPs and cache bytes grow with tokens, weight bytes don't."""
    peak_tflops = peaks["matmul_tflops"].get(dtype)
    if not peak_tflops:
        return
    r = max(rows, key=lambda row: row["total_tokens"])
    flops_per_token = r["flops"] / r["total_tokens"]
    bytes_per_token = (r["bytes"] - r["weight_bytes"]) / r["total_tokens"]
    lo, hi = min(row["total_tokens"] for row in rows), r["total_tokens"]
    xs = [lo * (hi / lo) ** (i / 40) for i in range(41)] if hi > lo else [lo]
    ys = [roofline_ms(flops_per_token * x, r["weight_bytes"] + bytes_per_token * x, peak_tflops, peaks["copy_gbs"])
          for x in xs]
    ax.plot(xs, ys, "k--", linewidth=1,
            label=f"roofline ({peak_tflops:.3g} TFLOP/s, {peaks['copy_gbs']:.0f} GB/s)")

