"""bench/serving_table.py, the tool that turns a device run's results.json and peers.json into
perf-notes' tables: its `met` verdict against each target of issues 14 and 15, on made-up runs
(no torch, no GPU)."""

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "serving_table.py")


@pytest.fixture(scope="module")
def st():
    if not os.path.exists(_PATH):
        pytest.skip(f"{_PATH} is not in this checkout")
    spec = importlib.util.spec_from_file_location("serving_table", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def result(config, shuf, contig=None, pct=None, h_q=16, flops=0.0, dtype="bf16"):
    return {"config": config, "dtype": dtype, "h_q": h_q, "flops": flops, "serving_us_per_layer_shuffled": shuf,
            "serving_us_per_layer_contiguous": shuf if contig is None else contig, "serving_pct_copy_shuffled": pct}


def peer_row(config, flashmla, fa3, etap):
    best = min(flashmla, fa3)
    return {"config": config, "peers": {"FlashMLA": {"shuffled": flashmla, "contiguous": flashmla},
                                        "FA3": {"shuffled": fa3, "contiguous": fa3}},
            "ratio": {"shuffled": etap / best, "contiguous": etap / best}}


def last_cell(row):
    return row.rstrip(" |").rsplit("|", 1)[1].strip()


# (config, etap µs, % copy, FLOPs, FlashMLA µs, FA3 µs, the verdict the table must print)
SERVING = [
    ("b16-sq1-h16-sk16k", 100.0, 92.0, 0.0, 110.0, 120.0, "yes (0.909)"),       # ≤ 0.94 of the best peer
    ("b16-sq1-h16-sk1k", 16.5, 38.9, 0.0, 19.4, 17.2, "no (0.959)"),            # ≤ 0.85
    ("b16-sq1-h16-sk64k", 395.5, 100.9, 0.0, 399.2, 401.0, "yes (100.9%)"),      # ≥ 98.5% copy
    ("b16-sq1-h16-sk64k", 300.0, 96.4, 0.0, 290.0, 300.0, "no (96.4%)"),
    ("b16-sq1-h128-sk64k", 581.8, 68.8, 292.1e9, 504.5, 518.0, "no (502 TFLOP/s)"),  # ≥ 620 TFLOP/s
    ("b16-sq1-h128-sk64k", 450.0, 80.0, 292.1e9, 500.0, 518.0, "yes (649 TFLOP/s)"),
    ("b16-sq1-h64-sk64k", 422.6, 94.6, 146.0e9, 430.9, 410.7, "no (0.981)"),    # ≤ 0.92 of FlashMLA (not of FA3)
    ("b16-sq1-h64-sk64k", 390.0, 94.6, 146.0e9, 430.9, 300.0, "yes (0.905)"),
]


@pytest.mark.parametrize("config, etap, pct, flops, fm, fa3, want", SERVING)
def test_serving_verdicts(st, config, etap, pct, flops, fm, fa3, want):
    results = {"results": [result(config, etap, pct=pct, flops=flops, h_q=int(config.split("-h")[1].split("-")[0]))]}
    peers = {"rows": [peer_row(config, fm, fa3, etap)]}
    lines = st.rows(results, peers)
    assert lines[0].endswith("| target (H200) | met |") and len(lines) == 3
    assert lines[2].count("|") == lines[0].count("|"), "the row's cells do not match the header's"
    assert last_cell(lines[2]) == want
    # A configuration without a target: an empty verdict.
    results = {"results": [result("b16-sq1-h16-sk2k", 23.6, pct=53.7)]}
    lines = st.rows(results, {"rows": [peer_row("b16-sq1-h16-sk2k", 25.1, 25.2, 23.6)]})
    assert lines[2].endswith("|  |  |"), lines[2]


# (config, 16-bit µs, 656 µs, 656 % copy, FlashMLA bf16 µs or None, the verdict)
FP8 = [
    ("b16-sq1-h16-sk64k", 395.5, 269.3, 84.0, 399.2, "no (1.47x, 1.48x FlashMLA, 84.0% copy)"),
    ("b16-sq1-h16-sk64k", 395.5, 230.0, 97.5, 399.2, "yes (1.72x, 1.74x FlashMLA, 97.5% copy)"),
    ("b16-sq1-h16-sk64k", 395.5, 230.0, 97.5, 370.0, "no (1.72x, 1.61x FlashMLA, 97.5% copy)"),
    ("b16-sq1-h16-sk16k", 108.6, 79.0, 70.8, None, "no (1.37x)"),
    ("b16-sq1-h16-sk16k", 108.6, 60.0, 90.0, None, "yes (1.81x)"),
    ("b16-sq1-h128-sk64k", 590.5, 1464.1, 15.0, 504.5, "no (0.40x)"),     # ≥ 1.0x: against the 16-bit cache only
    ("b16-sq1-h128-sk64k", 590.5, 580.0, 40.0, 300.0, "yes (1.02x)"),
]


@pytest.mark.parametrize("config, base, t656, pct, fm, want", FP8)
def test_fp8_verdicts(st, config, base, t656, pct, fm, want):
    results = {"results": [result(config, base), result(f"{config}-fp8-656", t656, pct=pct),
                           result(f"{config}-fp8-tensor", t656 * 0.9, pct=pct)]}
    peers = None if fm is None else {"rows": [peer_row(config, fm, fm * 1.1, base)]}
    lines = st.fp8_rows(results, peers)
    assert lines[0].endswith("| target (656, H200) | met |") and len(lines) == 3
    assert lines[2].count("|") == lines[0].count("|")
    assert last_cell(lines[2]) == want
