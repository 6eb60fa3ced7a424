"""What ``kvpack sweep`` writes: the rows' columns, the plain-text and markdown tables, the CSV and the plot.

A row (one per configuration, `kvpack.evaluation.sweep.run_sweep`) holds the configuration's columns
(`CONFIG_COLUMNS`: its name, the `kvpack.CachePolicy` fields it ran, preset, peer, kind) and the metrics of
`kvpack.evaluate`. The tables sort rows by bits per value; the plot is delta-ppl (symlog) and top-1 agreement
against the average bits per value of K and V as held (matplotlib, Agg).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from kvpack.evaluation.sweep_config import NO_POLICY, SweepConfig
from kvpack.policy import policy_to_dict

__all__ = ["CONFIG_COLUMNS", "config_columns", "format_markdown", "format_table", "plot", "write_csv"]

# the order of a row's configuration columns in the JSON and CSV files (kept as the sweep has always written them)
CONFIG_COLUMNS = (
    "name", "key", "value", "residual", "sinks", "skip_layers", "block", "layer_keys", "layer_values", "fp_heads",
    "preset", "head_keys", "head_values", "pre_rope_keys", "peer", "kind", "center_keys",
)  # fmt: skip


def config_columns(config: SweepConfig) -> dict:
    """The configuration columns of a row, JSON-able (tuples as lists): a preset's or a peer's policy fields
    are those of ``CachePolicy(None, None)`` (a preset's row takes its resolved policy after it ran)."""
    policy = policy_to_dict(config.policy or NO_POLICY)
    own = {"name": config.name, "preset": config.preset, "peer": config.peer, "kind": config.kind}
    return {k: own[k] if k in own else policy[k] for k in CONFIG_COLUMNS}


def format_table(rows: list[dict]) -> str:
    """The sweep as a plain-text table, sorted by bits per value."""
    width = max([len("config")] + [len(r["name"]) for r in rows])
    head = (
        f"{'config':{width}}  {'bits K':>7}{'bits V':>8}{'avg':>7}{'vs fp16':>9}{'ppl ref':>9}{'ppl':>9}"
        f"{'dppl %':>10}{'+-':>9}{'top-1':>8}{'KL':>9}  verdict"
    )
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["bits_per_value"], r["name"])):
        lines.append(
            f"{r['name']:{width}}  {r['bits_k']:7.3f}{r['bits_v']:8.3f}{r['bits_per_value']:7.3f}"
            f"{_smaller(r['bits_per_value']):>9}{r['ppl_ref']:9.3f}"
            f"{r['ppl']:9.3f}{r['delta_ppl_pct']:+10.3f}{r['delta_ppl_pct_std']:9.3f}{100 * r['top1']:7.2f}%"
            f"{r['kl']:9.5f}  {r['verdict']}"
        )
    return "\n".join(lines)


def _smaller(bits_per_value: float) -> str:
    """``6.1x``: how many times smaller than fp16 the cache is held (16 / bits per value)."""
    return "n/a" if math.isnan(bits_per_value) or bits_per_value <= 0 else f"{16 / bits_per_value:.1f}x"


def format_markdown(rows: list[dict]) -> str:
    """The sweep as a markdown table (BENCHMARKS.md), sorted by bits per value."""
    lines = [
        "| config | bits K | bits V | bits avg | ppl ref | ppl | delta-ppl % (+- std) | top-1 | KL | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["bits_per_value"], r["name"])):
        lines.append(
            f"| `{r['name']}` | {r['bits_k']:.3f} | {r['bits_v']:.3f} | {r['bits_per_value']:.3f} | {r['ppl_ref']:.3f} "
            f"| {r['ppl']:.3f} | {r['delta_ppl_pct']:+.2f} (+-{r['delta_ppl_pct_std']:.2f}) | {100 * r['top1']:.2f}% "
            f"| {r['kl']:.5f} | {r['verdict']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Rate-distortion PNG: delta-ppl % (symlog) and top-1 agreement against bits per value; peers as squares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (ax_ppl, ax_top) = plt.subplots(1, 2, figsize=(13, 5.2))
    for kind, marker, color in (("kvpack", "o", "tab:blue"), ("peer", "s", "tab:red")):
        pts = [r for r in rows if r["kind"] == kind and not math.isnan(r["bits_per_value"])]
        if not pts:
            continue
        xs = [r["bits_per_value"] for r in pts]
        ax_ppl.scatter(xs, [r["delta_ppl_pct"] for r in pts], marker=marker, color=color, label=kind, zorder=3)
        ax_top.scatter(xs, [100 * r["top1"] for r in pts], marker=marker, color=color, label=kind, zorder=3)
        for r in pts:
            label = r["name"].removeprefix("peer ")
            ax_ppl.annotate(label, (r["bits_per_value"], r["delta_ppl_pct"]), fontsize=6, alpha=0.8,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
            ax_top.annotate(label, (r["bits_per_value"], 100 * r["top1"]), fontsize=6, alpha=0.8,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax_ppl.set_yscale("symlog", linthresh=1.0)
    ax_ppl.set_xlabel("bits per value (K and V averaged, as held)")
    ax_ppl.set_ylabel("delta perplexity % (symlog)")
    ax_ppl.axhline(0, color="grey", lw=0.8)
    ax_top.set_xlabel("bits per value (K and V averaged, as held)")
    ax_top.set_ylabel("top-1 agreement with the uncompressed model %")
    for ax in (ax_ppl, ax_top):
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_csv(rows: list[dict], path: str | Path) -> None:
    """The rows as CSV, one column per row key (lists as JSON)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
