#!/usr/bin/env python3
"""ctest bench.gpu_table: bench/gpu_table.py turns GPU records into the table (no GPU needed).

The records below are a synthetic fixture in the shape loopmoe_bench --device cuda --json and
torch_peer.py --device cuda --json print (round numbers, not measurements): the test checks the
columns computed from them (ratios, MFU, GiB), that a failed or timed-out command becomes "-" with
its reason in the notes, and that peer variants whose step-0 losses disagree are flagged.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
GiB = 1024 ** 3


def rec(case, source, variant="", **kw):
    return {"case": case, "source": source, "variant": variant, **kw}


def main() -> int:
    records = [
        {"source": "meta", "data": {"date": "2000-01-01 00:00 UTC", "commit": "abc1234", "host": "h"}},
        rec("", "tests", status="ok", rc=0, seconds=12, detail="10 run: 10 passed, 0 skipped, 0 failed"),
        rec("a", "ours", data={"kind": "device", "name": "FIXTURE GPU", "sms": 100, "memory_bytes": 80 * GiB,
                               "compute_capability": "9.0", "driver": 13000, "runtime": 13000}),
        rec("a", "ours", data={"kind": "gemm", "n": 8192, "reps": 10, "mean_tflops": 500.0, "best_tflops": 510.0}),
        rec("a", "ours", data={"kind": "case", "tokens_per_s": 10000.0, "step_ms": 100.0, "mfu": 0.2,
                               "flops_per_token": 1e10, "peak_bytes": 2 * GiB, "finite": True}),
        rec("a", "ours", data={"kind": "profile", "case": "a", "device": "cuda", "steps": 3, "step_ms": 150.0,
                               "ops": [{"op": "attention_backward", "calls_per_step": 12.0,
                                        "ms_per_step": 60.0, "share": 0.4},
                                       {"op": "matmul_forward", "calls_per_step": 88.0,
                                        "ms_per_step": 15.0, "share": 0.1}]}),
        rec("a", "ours", status="ok", rc=0, seconds=5, detail=""),
        rec("a", "peer", "eager", data={"tokens_per_s": 2000.0, "first_loss": 10.0, "peak_mem_bytes": 4 * GiB}),
        rec("a", "peer", "eager", status="ok", rc=0, seconds=5, detail=""),
        rec("a", "peer", "grouped", data={"tokens_per_s": 5000.0, "first_loss": 10.5, "peak_mem_bytes": 3 * GiB,
                                          "experts": "torch._grouped_mm", "attention": "sdpa"}),
        rec("a", "peer", "grouped", status="ok", rc=0, seconds=5, detail=""),
        rec("a", "peer", "compile", status="timeout", rc=124, seconds=90, detail="stopped by timeout"),
        rec("b", "ours", status="failed", rc=1, seconds=2, detail="error: boom"),
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
        path = fh.name
    try:
        out = subprocess.run([sys.executable, os.path.join(HERE, "gpu_table.py"), path],
                             capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(path)
    print(out.stdout, out.stderr)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in out.stdout.splitlines() if line.startswith("| a ") or line.startswith("| b ")}
    want_a = ["a", "10,000", "100.0", "2,000", "5,000", "-", "5.00x", "2.00x (grouped)", "20.0%",
              "10.0%", "2.00", "3.00"]
    checks = [
        ("exit 0", out.returncode == 0),
        ("GPU line", "FIXTURE GPU (100 SMs, 80.0 GiB" in out.stdout),
        ("GEMM line", "500.0 TFLOP/s" in out.stdout),
        ("profile section", "Op profile of ours, a: 3 step(s) on cuda with a device synchronisation" in out.stdout
         and "| attention_backward | 12.0 | 60.00 | 40.0% |" in out.stdout),
        ("tests line", "10 run: 10 passed" in out.stdout),
        (f"row a = {want_a}", rows.get("a") == want_a),
        ("row b all '-'", rows.get("b", [None])[1:] == ["-"] * 11),
        ("compile timeout noted", "a: peer compile: timeout (exit 124, 90 s): stopped by timeout" in out.stdout),
        ("ours failure noted", "b: ours: failed (exit 1, 2 s): error: boom" in out.stdout),
        ("loss disagreement flagged", "peer step-0 losses disagree" in out.stdout),
    ]
    bad = [name for name, ok in checks if not ok]
    for name, ok in checks:
        print(f"{'ok' if ok else 'FAILED'}: {name}")
    if rows.get("a") != want_a:
        print(f"row a was {rows.get('a')}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
