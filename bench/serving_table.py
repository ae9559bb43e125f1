#!/usr/bin/env python3
"""perf-notes' serving tables, as markdown rows, from the files a device call brought back.

Usage (here):
    python3 bench/serving_table.py DIR            # DIR: the `bench` step's results.json and
                                                  # the peers.json bench/peers.py wrote beside it
    python3 bench/serving_table.py --fp8 DIR [PEERS_DIR]
                                                  # DIR: the `fp8` step's results.json (each
                                                  # configuration with the 16-bit cache and the
                                                  # FP8 formats); PEERS_DIR: the same machine's
                                                  # `bench` step, for FlashMLA's bf16 times

The first form, perf-notes' "Current numbers": one row per bf16 configuration that both files
have: etap's serving time with the block table shuffled / contiguous (and its TFLOP/s at 64+
heads, the issue's compute-bound shapes), etap's % of the copy roof (shuffled), each peer's two
times, the ratio etap / best peer for each table, issue 15's target for the shape and whether
the shuffled table's figure meets it (`met`: yes / no, with the figure the target reads).

The second, perf-notes' "FP8 caches": one row per configuration with an FP8 row: the 16-bit
cache, FlashMLA's format and the per-tensor one (shuffled / contiguous; % of the copy roof
counting the FP8 bytes, shuffled), how much faster FlashMLA's format is than the 16-bit cache
and than FlashMLA's bf16 (shuffled), issue 14's target and whether FlashMLA's format meets it
(shuffled; without PEERS_DIR the FlashMLA half of a 1.65x target is not judged).

The numbers are the files'; nothing is measured here. Each form prints the run's card and copy
roof first, so that the table keeps them.
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


def met(ok, figure):
    """A `met` cell: yes / no and the figure judged, or n/a where the figure is missing."""
    return "n/a" if ok is None else f"{'yes' if ok else 'no'} ({figure})"


def verdict(target, r, p):
    """Whether configuration `r` (results.json) with its peers `p` (peers.json) meets issue 15's
    `target`, on the shuffled table: `≤ X` etap / best peer, `≤ X of FlashMLA` etap /
    FlashMLA, `≥ X% copy`, `≥ X TFLOP/s`."""
    shuf = r["serving_us_per_layer_shuffled"]
    bound = float(target.split()[1].rstrip("%"))
    if target.endswith("% copy"):
        pct = r["serving_pct_copy_shuffled"]
        return met(None if pct is None else pct >= bound, f"{pct:.1f}%" if pct is not None else "")
    if target.endswith("TFLOP/s"):
        tflops = r["flops"] / (shuf * 1e-6) / 1e12 if shuf else None
        return met(None if tflops is None else tflops >= bound, f"{tflops:.0f} TFLOP/s" if tflops else "")
    if target.endswith("of FlashMLA"):
        fm = p["peers"].get("FlashMLA", {}).get("shuffled")
        ratio = shuf / fm if shuf and fm else None
        return met(None if ratio is None else ratio <= bound, f"{ratio:.3f}" if ratio else "")
    ratio = p["ratio"]["shuffled"]
    return met(None if ratio is None or ratio != ratio else ratio <= bound, f"{ratio:.3f}" if ratio else "")


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
        ok = verdict(target, r, p) if target else ""
        out.append(f"| {label(r['config'])} | {etap} | {pct} | " + " | ".join(peer_cells)
                   + f" | {ratio} | {target} | {ok} |")
    header = ["| shape | etap µs | % copy | " + " | ".join(f"{n} µs" for n in names)
              + " | ratio | target (H200) | met |", "|" + "---|" * (len(names) + 6)]
    return header + out


# Issue 14's targets for FlashMLA's format (set for the H200), by configuration: the
# memory-bound shapes 1.65x faster than both bf16 kernels (the byte ratio is 1.76x), 97% of
# the copy roof at 64K; the compute-bound ones no slower than the 16-bit cache.
FP8_TARGETS = {
    "b16-sq1-h16-sk16k": "≥ 1.65x",
    "b16-sq1-h16-sk32k": "≥ 1.65x",
    "b16-sq1-h16-sk64k": "≥ 1.65x, ≥ 97% copy",
    "b64-sq1-h16-sk8k": "≥ 1.65x",
    "b32-sq1-h16-varlen8k": "≥ 1.65x",
    "b16-sq1-h128-sk64k": "≥ 1.0x",
    "b16-sq1-h128-sk16k": "≥ 1.0x",
    "b64-sq1-h128-sk4k": "≥ 1.0x",
    "b16-sq2-h64-sk4k": "≥ 1.0x",
}
FP8_FORMATS = ("fp8-656", "fp8-tensor")


def fp8_verdict(target, base, f656, flashmla_us):
    """Whether FlashMLA's format (`f656`, results.json's row) meets issue 14's `target` on the
    shuffled table: `≥ Xx` faster than the 16-bit cache (`base`) and, for the memory-bound
    shapes' 1.65x, than FlashMLA's bf16 (`flashmla_us`; None: not judged), `≥ X% copy`."""
    t656 = f656["serving_us_per_layer_shuffled"] if f656 else None
    if not t656:
        return met(None, "")
    checks, figures = [], []
    for part in target.split(", "):
        bound = float(part.split()[1].rstrip("x%"))
        if part.endswith("% copy"):
            pct = f656["serving_pct_copy_shuffled"]
            checks.append(None if pct is None else pct >= bound)
            figures.append("" if pct is None else f"{pct:.1f}% copy")
            continue
        x = base["serving_us_per_layer_shuffled"] / t656
        checks.append(x >= bound)
        figures.append(f"{x:.2f}x")
        if bound > 1 and flashmla_us:
            checks.append(flashmla_us / t656 >= bound)
            figures.append(f"{flashmla_us / t656:.2f}x FlashMLA")
    ok = None if None in checks else all(checks)
    return met(ok, ", ".join(figures))


def fp8_rows(results, peers=None):
    """The FP8 table's markdown rows, in results.json's order of the 16-bit configurations."""
    by_config = {r["config"]: r for r in results["results"] if r["dtype"] == "bf16"}
    flashmla = {}
    if peers is not None:
        flashmla = {r["config"]: r["peers"].get("FlashMLA", {}).get("shuffled") for r in peers["rows"]}
    out = []
    for name, base in by_config.items():
        fmts = [by_config.get(f"{name}-{f}") for f in FP8_FORMATS]
        if name.endswith(FP8_FORMATS) or not any(fmts):
            continue
        cells = [cell(base["serving_us_per_layer_shuffled"], base["serving_us_per_layer_contiguous"], ".1f")]
        for r in fmts:
            if r is None:
                cells.append("")
                continue
            pct = r["serving_pct_copy_shuffled"]
            cells.append(cell(r["serving_us_per_layer_shuffled"], r["serving_us_per_layer_contiguous"], ".1f")
                         + ("" if pct is None else f" ({pct:.1f}%)"))
        f656 = fmts[0]["serving_us_per_layer_shuffled"] if fmts[0] else None
        speedup = lambda t: "" if not (t and f656) else f"{t / f656:.2f}x"
        cells.append(speedup(base["serving_us_per_layer_shuffled"]))
        cells.append(speedup(flashmla.get(name)) if flashmla else "n/a")
        target = FP8_TARGETS.get(name, "")
        ok = fp8_verdict(target, base, fmts[0], flashmla.get(name) if flashmla else None) if target else ""
        out.append(f"| {label(name)} | " + " | ".join(cells) + f" | {target} | {ok} |")
    header = ["| shape | 16-bit cache µs | FP8-656 µs | FP8 per-tensor µs | 656 vs the 16-bit cache "
              "| 656 vs FlashMLA bf16 | target (656, H200) | met |", "|" + "---|" * 8]
    return header + out


def main():
    args = sys.argv[1:]
    fp8 = args[:1] == ["--fp8"]
    if fp8:
        args = args[1:]
    if not 1 <= len(args) <= (2 if fp8 else 1):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    results = json.load(open(os.path.join(args[0], "results.json")))
    copy = results["copy_gbps"]
    if fp8:
        peers = json.load(open(os.path.join(args[1], "peers.json"))) if len(args) == 2 else None
        print(f"{results['card']}, copy {copy:.0f} GB/s; each cell: block table shuffled / contiguous "
              "(% of the copy roof counting the cache's bytes, shuffled); speedups of the shuffled times")
        lines = fp8_rows(results, peers)
    else:
        peers = json.load(open(os.path.join(args[0], "peers.json")))
        print(f"{results['card']}, copy {copy:.0f} GB/s, {peers['layers']} layers; "
              "each cell: block table shuffled / contiguous; % copy of the shuffled time")
        lines = rows(results, peers)
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
