#!/usr/bin/python3
"""bench/attention_peer.py on the CPU (Debian's python3-torch): its written-out attention is causal
attention (against a row-by-row loop), and every implementation gets one JSON line, timed or
unavailable with a reason, whatever the installed torch has."""
import io
import json
import math
import os
import sys
from contextlib import redirect_stdout

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention_peer  # noqa: E402


def naive(q, k, v):
    B, H, T, hd = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                s = torch.tensor([float(q[b, h, t] @ k[b, h, u]) / math.sqrt(hd)
                                  for u in range(t + 1)])
                p = torch.softmax(s, dim=0)
                out[b, h, t] = sum(p[u] * v[b, h, u] for u in range(t + 1))
    return out


def main():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 9, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    got = attention_peer.explicit_attention(q, k, v)
    assert torch.allclose(got, naive(q, k, v), atol=1e-12), "explicit attention is not causal attention"

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = attention_peer.main(["--device", "cpu", "--batch", "2", "--seq-len", "33", "--heads",
                                  "2", "--head-dim", "8", "--dtype", "fp32", "--repeats", "1"])
    assert rc == 0, rc
    records = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [r["impl"] for r in records] == ["explicit", "cudnn", "flash", "efficient", "math"], records
    for r in records:
        assert r["kind"] == "attention_peer" and r["seq_len"] == 33, r
        if r["status"] == "ok":
            assert r["ms"] > 0 and math.isfinite(r["ms"]), r
            assert r.get("max_abs_diff", 0.0) < 1e-4, r
        else:
            assert r["status"] == "unavailable" and r["reason"], r
    assert records[0]["status"] == "ok", records[0]
    print("attention_peer: ok (%s)" % ", ".join("%s %s" % (r["impl"], r["status"]) for r in records))


if __name__ == "__main__":
    main()
