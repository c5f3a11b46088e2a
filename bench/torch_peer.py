#!/usr/bin/python3
"""PyTorch peer for the LoopMoE training-throughput benchmark.

    /usr/bin/python3 bench/torch_peer.py --config configs/loopmoe_tiny.toml --steps 20 --threads 1 \
        [--warmup 3] [--batch B] [--seq-len T] [--seed S] [--json] \
        [--device cpu|cuda[:N]] [--variant eager|grouped|compile] [--max-seconds X]

Trains the config's model (tests/reference/loopmoe_ref.py) on uniformly random tokens with the
config's batch_size x seq_len, AdamW (torch.optim.AdamW, weight decay on rank >= 2 tensors only),
the MODEL.md LR schedule and global-norm clipping — the same work per step as the C++ trainer.
Prints tokens/s measured over the steps after the warm-up (one step = forward + backward + clip +
optimiser update).

--device cpu (default): float32. --device cuda: parameters and optimiser in float32, forward and
loss under torch.autocast(bfloat16) (bf16 matmuls with fp32 accumulation), a
torch.cuda.synchronize() on each side of every timed step, peak memory by
torch.cuda.max_memory_allocated.

--variant (bench/peer_model.py has the details):
  eager    the reference as written: per-expert gather / index_add loop (host reads of the
           routing counts), attention written out over T x T; torch.optim.AdamW(foreach=True).
           The default, and on the CPU exactly what this peer always ran.
  grouped  PyTorch's best eager form: expert matmuls grouped as torchtitan does them (tokens
           sorted by expert; torch._grouped_mm on a GPU whose torch has it, else a padded
           torch.bmm — the JSON's "experts" says which), scaled_dot_product_attention where torch
           has it (--attention), fused AdamW on a GPU.
  compile  the grouped variant's forward and loss under torch.compile (default mode, static
           shapes); the warm-up steps include the compilation (JSON "warmup_s").
"""
from __future__ import annotations

import argparse
import contextlib
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


def _fail(message: str) -> int:
    print(f"torch_peer: error: {message}", file=sys.stderr)
    return 2


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
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--variant", choices=("eager", "grouped", "compile"), default="eager")
    ap.add_argument("--attention", choices=("auto", "ref", "sdpa"), default="auto",
                    help="grouped/compile: scaled_dot_product_attention (auto: where torch has it) or "
                         "the reference's written-out attention (eager always uses the reference's)")
    ap.add_argument("--experts", choices=("auto", "grouped_mm", "bmm", "loop"), default="auto",
                    help="grouped/compile: the grouped expert product (auto: torch._grouped_mm on a "
                         "GPU where torch has it, else bmm; loop: a per-group CPU stand-in)")
    ap.add_argument("--max-seconds", type=float, default=0.0,
                    help="stop the timed steps once they took this long (at least one step; 0: no limit)")
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
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "tests", "reference"))
    sys.path.insert(0, here)
    import loopmoe_ref as ref

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        return _fail(f"--device {args.device}: {e}")
    if device.type not in ("cpu", "cuda"):
        return _fail(f"--device {args.device}: expected cpu, cuda or cuda:N")
    on_gpu = device.type == "cuda"
    if on_gpu:
        if not torch.cuda.is_available():
            return _fail(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            return _fail(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if args.variant == "compile" and not hasattr(torch, "compile"):
        return _fail(f"--variant compile needs torch.compile (PyTorch >= 2.0); this is torch {torch.__version__}")

    conf = ref.load_toml(args.config)
    cfg = ref.ModelConfig.from_dict(conf["model"])
    tc = ref.TrainConfig.from_dict(conf.get("train", {}))
    B = args.batch or tc.batch_size
    T = args.seq_len or cfg.seq_len

    if args.variant == "eager":
        attention, experts = "ref", "ref"
    else:
        import peer_model
        attention = peer_model.resolve_attention(args.attention)
        experts = peer_model.resolve_experts(args.experts, device)
    if device.type == "cpu" and args.variant == "eager":
        model = ref.LoopMoERef(cfg)  # exactly the peer as it always was
    else:
        import peer_model
        model = peer_model.PeerModel(cfg, device, attention=attention, experts=experts)
        model.warm_constants(T)

    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    P = model.init_params(seed=args.seed, dtype=torch.float32)
    P = OrderedDict((k, v.to(device).requires_grad_(True)) for k, v in P.items())
    decay = [p for p in P.values() if ref.is_decayed(p.shape)]
    no_decay = [p for p in P.values() if not ref.is_decayed(p.shape)]
    fused = on_gpu and args.variant != "eager"
    opt_kind = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, **opt_kind)
    gen = torch.Generator().manual_seed(args.seed)
    params = list(P.values())

    def loss_of(P_, inp_, tgt_):
        return model.forward(P_, inp_, tgt_).loss

    if args.variant == "compile":
        loss_of = torch.compile(loss_of, dynamic=False)
    autocast = (lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)) if on_gpu \
        else contextlib.nullcontext

    def step(s: int) -> float:
        tok = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=gen)
        if on_gpu:
            tok = tok.to(device)
        inp, tgt = tok[:, :-1], tok[:, 1:]
        for grp in opt.param_groups:
            grp["lr"] = ref.lr_at(s, tc)
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_of(P, inp, tgt)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        return loss.item()

    def sync():
        if on_gpu:
            torch.cuda.synchronize(device)

    first_loss = None
    t_warm = time.perf_counter()
    for s in range(args.warmup):
        loss = step(s)
        first_loss = loss if first_loss is None else first_loss
    sync()
    warmup_s = time.perf_counter() - t_warm
    times = []
    loss = float("nan")
    for s in range(args.warmup, args.warmup + args.steps):
        if args.max_seconds > 0 and times and sum(times) >= args.max_seconds:
            break
        sync()
        t0 = time.perf_counter()
        loss = step(s)
        sync()
        times.append(time.perf_counter() - t0)
        first_loss = loss if first_loss is None else first_loss
    total = sum(times)
    tokens_per_s = B * T * len(times) / total if total > 0 else float("nan")
    step_ms = 1000.0 * total / max(1, len(times))
    precision = "bf16-autocast" if on_gpu else "float32"
    result = {"threads": args.threads, "tokens_per_s": round(tokens_per_s, 1), "step_ms": round(step_ms, 2),
              "config": os.path.basename(args.config), "batch": B, "seq_len": T, "steps": len(times),
              "warmup": args.warmup, "min_step_ms": round(1000.0 * min(times), 2) if times else None,
              "final_loss": round(loss, 5), "num_params": model.num_params,
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "blas_threads": _blas_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "impl": "pytorch-eager-float32" if precision == "float32" and args.variant == "eager"
              else f"pytorch-{args.variant}-{precision}",
              "device": str(device), "variant": args.variant, "precision": precision,
              "attention": "reference (written out)" if attention == "ref" else "scaled_dot_product_attention",
              "experts": {"ref": "per-expert loop", "grouped_mm": "torch._grouped_mm",
                          "bmm": "padded torch.bmm", "loop": "per-group loop (test stand-in)"}[experts],
              "optimizer": "AdamW fused" if fused else "AdamW foreach",
              "first_loss": round(first_loss, 6) if first_loss is not None else None,
              "warmup_s": round(warmup_s, 3)}
    if on_gpu:
        result["gpu"] = torch.cuda.get_device_name(device)
        result["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(device))
        result["peak_mem_source"] = "torch.cuda.max_memory_allocated"
    if not args.json:
        where = result.get("gpu") or platform.processor() or platform.machine()
        how = "" if args.variant == "eager" and not on_gpu else f"{args.variant} on {device} ({precision}), "
        print(f"{args.config}: {model.num_params} params, B={B} T={T}, threads={args.threads}, {how}"
              f"{len(times)} steps after {args.warmup} warm-up: {step_ms:.1f} ms/step, "
              f"{tokens_per_s:.0f} tokens/s (loss {loss:.4f}; {where})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
