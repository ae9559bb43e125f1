#!/usr/bin/env python3
"""The serving table of docs/perf-notes.md ("Current numbers"), as markdown rows, from one run's
etap-bench results.json and the peers.json that bench/peers.py wrote beside it.

Usage (here, on the files a device call brought back):
    python3 bench/serving_table.py DIR            # DIR holds results.json and peers.json

One row per bf16 configuration that both files have: etap's serving time with the block table
shuffled / contiguous (and its TFLOP/s at 64+ heads, the issue's compute-bound shapes), etap's
% of the copy roof (shuffled), each peer's two times, the ratio etap / best peer for each
table, and issue 15's target for the shape. The numbers are the files'; nothing is measured
here. Prints the run's card and copy roof first, so the table keeps them.
"""
import json
import os
import sys

# Issue 15's targets (set for the H200), by etap-bench's configuration name.
TARGETS = {
    "b16-sq1-h16-sk1k": "≤ 0.85",
    "b16-sq1-h16-sk4k": "≤ 0.90",
    "b16-sq1-h16-sk16k": "≤ 0.94",
    "b16-sq1-h16-sk64k": "≥ 98.5% copy",
    "b16-sq2-h16-sk64k": "≤ 0.93",
    "b16-sq1-h32-sk64k": "≤ 0.93",
    "b32-sq2-h16-sk8k": "≤ 0.93",
    "b16-sq2-h16-sk16k": "≤ 0.93",
    "b16-sq1-h64-sk64k": "≤ 0.92 of FlashMLA",
    "b16-sq2-h64-sk4k": "≤ 0.92 of FlashMLA",
    "b16-sq1-h128-sk64k": "≥ 620 TFLOP/s",
    "b64-sq1-h128-sk4k": "≥ 620 TFLOP/s",
    "b128-sq1-h16-sk1k": "≤ 0.90",
    "imbalanced-sq1-h16": "≤ 0.80",
    "imbalanced-sq2-h16": "≤ 0.80",
    "imbalanced-sq4-h16": "≤ 0.80",
}

# The short names perf-notes gives the default configurations.
LABELS = {
    "b16-sq2-h16-sk64k": "s_q 2 h16 64K",
    "b16-sq1-h32-sk64k": "h32 64K",
    "b16-sq1-h64-sk64k": "h64 64K",
    "b16-sq1-h128-sk64k": "h128 64K",
    "b32-sq2-h16-sk8k": "b32 s_q 2 8K",
    "b16-sq2-h16-sk16k": "b16 s_q 2 16K",
    "b16-sq2-h64-sk4k": "b16 s_q 2 h64 4K",
    "b32-sq1-h16-varlen8k": "b32 varlen 8K",
    "imbalanced-sq1-h16": "imbalanced s_q 1",
    "imbalanced-sq2-h16": "imbalanced s_q 2",
    "imbalanced-sq4-h16": "imbalanced s_q 4",
}


def label(config):
    """`b16-sq1-h16-sk1k` -> `b16 h16 1K`; the configurations above by their perf-notes names."""
    if config in LABELS:
        return LABELS[config]
    parts = config.split("-")
    if len(parts) == 4 and parts[1] == "sq1" and parts[3].startswith("sk"):
        return f"{parts[0]} {parts[2]} {parts[3][2:].upper()}"
    return config


def cell(a, b, fmt):
    return " / ".join("n/a" if v is None or v != v else format(v, fmt) for v in (a, b))


def rows(results, peers):
    """The markdown rows, in results.json's order."""
    by_config = {r["config"]: r for r in peers["rows"]}
    names = list(next(iter(by_config.values()))["peers"]) if by_config else []
    out = []
    for r in results["results"]:
        p = by_config.get(r["config"])
        if r["dtype"] != "bf16" or p is None:
            continue
        shuf, contig = r["serving_us_per_layer_shuffled"], r["serving_us_per_layer_contiguous"]
        etap = cell(shuf, contig, ".1f")
        if r["h_q"] >= 64 and shuf:
            etap += f" ({r['flops'] / (shuf * 1e-6) / 1e12:.0f} TFLOP/s)"
        pct = r["serving_pct_copy_shuffled"]
        pct = "n/a" if pct is None else f"{pct:.1f}"
        peer_cells = [cell(p["peers"][n]["shuffled"], p["peers"][n]["contiguous"], ".1f") for n in names]
        ratio = cell(p["ratio"]["shuffled"], p["ratio"]["contiguous"], ".3f")
        target = TARGETS.get(r["config"], "")
        out.append(f"| {label(r['config'])} | {etap} | {pct} | " + " | ".join(peer_cells)
                   + f" | {ratio} | {target} |")
    header = ["| shape | etap µs | % copy | " + " | ".join(f"{n} µs" for n in names) + " | ratio | target (H200) |",
              "|" + "---|" * (len(names) + 5)]
    return header + out


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    d = sys.argv[1]
    results = json.load(open(os.path.join(d, "results.json")))
    peers = json.load(open(os.path.join(d, "peers.json")))
    copy = results["copy_gbps"]
    print(f"{results['card']}, copy {copy:.0f} GB/s, {peers['layers']} layers; "
          "each cell: block table shuffled / contiguous; % copy of the shuffled time")
    for line in rows(results, peers):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
