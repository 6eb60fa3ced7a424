"""Markdown tables for BENCHMARKS.md from the JSON that `benchmarks/gpu_kernels.py` / `kvpack bench` write.

Usage: ``python benchmarks/kernels_table.py DIR`` (DIR holding attention.json and encode.json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def attention_table(result: dict) -> str:
    specs = result["codecs"]
    head = "| ctx | batch | SDPA fp16 us (% copy) | " + " | ".join(f"{s} us (x SDPA, % copy)" for s in specs) + " |"
    lines = [head, "|" + "---|" * (3 + len(specs))]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['context']} | {row['batch']} | skipped: {row['skipped']} |")
            continue
        cells = [f"{row['context']}", f"{row['batch']}", f"{row['sdpa_us']:.1f} ({row['sdpa_pct_copy']:.0f}%)"]
        for s in specs:
            r = row[s]
            cells.append(f"{r['us']:.1f} (x{r['speedup']:.2f}, {r['pct_copy']:.0f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def encode_table(result: dict) -> str:
    lines = ["| codec | tokens x heads | us | G vectors/s | % copy |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['codec']} | {r['tokens']} x 8 | {r['us']:.1f} | {r['gvectors_per_s']:.2f} | {r['pct_copy']:.0f}% |"
        )
    return "\n".join(lines)


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    att = json.loads((folder / "attention.json").read_text())
    enc = json.loads((folder / "encode.json").read_text())
    print(f"device {att['device']}, torch {att['torch']}, copy {att['copy_tbps']:.2f} TB/s, {att['date']}\n")
    print(attention_table(att) + "\n")
    print(encode_table(enc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
