#!/usr/bin/python3
"""PyTorch's causal attention on one shape, for comparison with LoopMoE's fused attention kernels.

    python3 bench/attention_peer.py [--device cuda|cpu] [--batch 16] [--seq-len 1024]
        [--heads 12] [--head-dim 64] [--dtype bf16|fp32] [--repeats 3]

Times forward + backward of causal attention on q, k, v [B, H, T, hd] (dout random), best of
--repeats after one warm-up, a device synchronisation on each side, once per implementation:

  explicit  softmax(q kᵀ / √hd, causal mask) v written out (T × T in memory): runs everywhere.
  cudnn, flash, efficient, math
            torch.nn.functional.scaled_dot_product_attention(is_causal=True) pinned to one
            backend with torch.nn.attention.sdpa_kernel (torch ≥ 2.3); "cudnn" is cuDNN's fused
            attention, the one issue 9 asks us to measure beside our own kernel.

One JSON object per line: {"kind": "attention_peer", "impl", "status": "ok" | "unavailable",
"ms", "max_abs_diff" (of the output against explicit's), "reason" (when unavailable), and the
shape}. An implementation the installed torch or device cannot run is reported unavailable with
its error, not skipped. scripts/gpu_check.sh runs this at the gpu_small shape (16 × 1024 tokens,
12 heads of 64, bf16) next to the Cuda* test CudaAttention.TimingAtModelScale, which prints our
fused kernels' time on the same shape.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch


def explicit_attention(q, k, v):
    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def sdpa_with(backend_name):
    """scaled_dot_product_attention pinned to one backend, or the reason it cannot be."""
    F = torch.nn.functional
    if not hasattr(F, "scaled_dot_product_attention"):
        return None, "torch %s has no scaled_dot_product_attention" % torch.__version__
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None, "torch %s has no torch.nn.attention.sdpa_kernel" % torch.__version__
    member = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
              "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}[backend_name]
    if not hasattr(SDPBackend, member):
        return None, "torch %s has no SDPBackend.%s" % (torch.__version__, member)
    backend = getattr(SDPBackend, member)

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run, None


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_one(fn, q, k, v, dout, repeats, device):
    """Best wall time (ms) of forward + backward, and the forward's output."""
    best = math.inf
    out = None
    for run in range(repeats + 1):  # run 0: the warm-up
        for t in (q, k, v):
            t.grad = None
        synchronize(device)
        start = time.perf_counter()
        out = fn(q, k, v)
        out.backward(dout)
        synchronize(device)
        ms = (time.perf_counter() - start) * 1e3
        if run > 0:
            best = min(best, ms)
    return best, out.detach()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for name in ("batch", "seq_len", "heads", "head_dim", "repeats"):
        if getattr(a, name) < 1:
            ap.error("--%s must be at least 1" % name.replace("_", "-"))
    try:
        device = torch.device(a.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is available to torch %s" % torch.__version__)
    except RuntimeError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(a.seed)
    shape = (a.batch, a.heads, a.seq_len, a.head_dim)

    def tensor():
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v, dout = tensor(), tensor(), tensor(), tensor()
    for t in (q, k, v):
        t.requires_grad_(True)
    common = {"kind": "attention_peer", "device": str(device), "dtype": a.dtype, "batch": a.batch,
              "seq_len": a.seq_len, "heads": a.heads, "head_dim": a.head_dim,
              "torch": torch.__version__}
    try:
        explicit_ms, reference = time_one(explicit_attention, q, k, v, dout, a.repeats, device)
        print(json.dumps(dict(common, impl="explicit", status="ok", ms=round(explicit_ms, 3),
                              max_abs_diff=0.0)), flush=True)
    except RuntimeError as e:  # out of memory at a large shape: T × T per head
        reference = None
        print(json.dumps(dict(common, impl="explicit", status="unavailable",
                              reason=str(e).split("\n")[0][:300])), flush=True)
    for name in ("cudnn", "flash", "efficient", "math"):
        fn, reason = sdpa_with(name)
        record = dict(common, impl=name)
        if fn is not None:
            try:
                ms, out = time_one(fn, q, k, v, dout, a.repeats, device)
                record.update(status="ok", ms=round(ms, 3))
                if reference is not None:
                    record["max_abs_diff"] = float((out.float() - reference.float()).abs().max())
            except RuntimeError as e:  # "No available kernel", out of memory, ...
                reason = str(e).split("\n")[0][:300]
        if "status" not in record:
            record.update(status="unavailable", reason=reason)
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
