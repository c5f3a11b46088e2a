#!/usr/bin/python3
"""PyTorch peer for the LoopMoE training-throughput benchmark.

    /usr/bin/python3 bench/torch_peer.py --config configs/loopmoe_tiny.toml --steps 20 --threads 1 \
        [--warmup 3] [--batch B] [--seq-len T] [--seed S] [--json]

Trains the config's model (tests/reference/loopmoe_ref.py, float32) on uniformly random tokens
with the config's batch_size x seq_len, AdamW (torch.optim.AdamW, weight decay on rank >= 2 tensors
only), the MODEL.md LR schedule and global-norm clipping — the same work per step as the C++
trainer. The MoE is the usual PyTorch per-expert gather / index_add. Prints tokens/s measured over
the steps after the warm-up (one step = forward + backward + clip + optimiser update).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time
from collections import OrderedDict


def _blas_threads():
    """Thread count of the OpenBLAS torch calls into (Debian's torch uses the system BLAS)."""
    for lib in ("libopenblas.so.0", "libblas.so.3"):
        try:
            fn = getattr(ctypes.CDLL(lib), "openblas_get_num_threads")
            return int(fn())
        except (OSError, AttributeError):
            continue
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, required=True, help="measured steps (after warm-up)")
    ap.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--batch", type=int, help="override train.batch_size")
    ap.add_argument("--seq-len", type=int, help="override model.seq_len")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)

    # Debian's torch does its matmuls in the system OpenBLAS, whose own thread pool ignores
    # torch.set_num_threads and defaults to every core: pin it (and OpenMP) to --threads before
    # torch (and with it libopenblas) is loaded. An explicit OPENBLAS_NUM_THREADS is overridden.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    # torch's OpenMP team and OpenBLAS's pthread pool take turns; with libgomp's default spin-wait
    # the idle OpenMP threads steal the cores OpenBLAS needs (measured: 2 threads ran at half the
    # speed of 1). Passive waiting gives the peer its best throughput; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    global torch, ref
    sys.dont_write_bytecode = True  # keep the source tree clean
    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
    import loopmoe_ref as ref

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    conf = ref.load_toml(args.config)
    cfg = ref.ModelConfig.from_dict(conf["model"])
    tc = ref.TrainConfig.from_dict(conf.get("train", {}))
    B = args.batch or tc.batch_size
    T = args.seq_len or cfg.seq_len
    model = ref.LoopMoERef(cfg)

    P = model.init_params(seed=args.seed, dtype=torch.float32)
    P = OrderedDict((k, v.requires_grad_(True)) for k, v in P.items())
    decay = [p for p in P.values() if ref.is_decayed(p.shape)]
    no_decay = [p for p in P.values() if not ref.is_decayed(p.shape)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, foreach=True)
    gen = torch.Generator().manual_seed(args.seed)
    params = list(P.values())

    def step(s: int) -> float:
        tok = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=gen)
        inp, tgt = tok[:, :-1], tok[:, 1:]
        for grp in opt.param_groups:
            grp["lr"] = ref.lr_at(s, tc)
        opt.zero_grad(set_to_none=True)
        out = model.forward(P, inp, tgt)
        out.loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        return out.loss.item()

    for s in range(args.warmup):
        step(s)
    times = []
    loss = float("nan")
    for s in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = step(s)
        times.append(time.perf_counter() - t0)
    total = sum(times)
    tokens_per_s = B * T * len(times) / total if total > 0 else float("nan")
    step_ms = 1000.0 * total / max(1, len(times))
    result = {"threads": args.threads, "tokens_per_s": round(tokens_per_s, 1), "step_ms": round(step_ms, 2),
              "config": os.path.basename(args.config), "batch": B, "seq_len": T, "steps": len(times),
              "warmup": args.warmup, "min_step_ms": round(1000.0 * min(times), 2) if times else None,
              "final_loss": round(loss, 5), "num_params": model.num_params,
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "blas_threads": _blas_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "impl": "pytorch-eager-float32"}
    if not args.json:
        print(f"{args.config}: {model.num_params} params, B={B} T={T}, threads={args.threads}, "
              f"{len(times)} steps after {args.warmup} warm-up: {step_ms:.1f} ms/step, "
              f"{tokens_per_s:.0f} tokens/s (loss {loss:.4f}; {platform.processor() or platform.machine()})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
