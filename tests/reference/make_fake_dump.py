#!/usr/bin/python3
"""Write a parity dump (docs/MODEL.md "Parity dump") from the Python reference model itself, in
float32, so that check_parity.py can be self-tested before (and independently of) the C++ dump tool.

    /usr/bin/python3 tests/reference/make_fake_dump.py DIR --config configs/loopmoe_tiny.toml \
        [--iter-adaln off|iter|token|joint] [--batch 2] [--seq-len 16] [--steps 10] [--seed 0] \
        [--capacity-factor C] [--untied] [--no-renormalize] [--total-steps N] [--warmup-steps W] \
        [--perturb 0.02] [--dtype float32|float64] \
        [--corrupt-grad NAME=FACTOR] [--corrupt-logits FACTOR] [--corrupt-train-loss IDX=FACTOR] \
        [--corrupt-dropped DELTA]

The --corrupt-* flags inject a deliberate error after computing the true values (negative test).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loopmoe_ref as ref  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output directory")
    ap.add_argument("--config", required=True, help="TOML config ([model] and [train] tables)")
    ap.add_argument("--iter-adaln", choices=ref.IADALN_MODES)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="number of AdamW steps K")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--capacity-factor", type=float)
    ap.add_argument("--untied", action="store_true", help="tie_embeddings = false")
    ap.add_argument("--no-renormalize", action="store_true", help="renormalize = false")
    ap.add_argument("--total-steps", type=int, help="override train.steps (LR schedule length)")
    ap.add_argument("--warmup-steps", type=int, help="override train.warmup_steps")
    ap.add_argument("--perturb", type=float, default=0.02, help="std of the perturbation added to every tensor")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                    help="precision the dump's values are computed in (files are always float32)")
    ap.add_argument("--corrupt-grad", metavar="NAME=FACTOR", help="scale one gradient tensor")
    ap.add_argument("--corrupt-logits", type=float, metavar="FACTOR", help="scale all logits")
    ap.add_argument("--corrupt-train-loss", metavar="IDX=FACTOR", help="scale one train loss")
    ap.add_argument("--corrupt-dropped", type=int, metavar="DELTA", help="add DELTA to the dropped count")
    args = ap.parse_args(argv)

    conf = ref.load_toml(args.config)
    model_d = dict(conf["model"])
    train_d = dict(conf.get("train", {}))
    if args.iter_adaln is not None:
        model_d["iter_adaln"] = args.iter_adaln
    if args.capacity_factor is not None:
        model_d["capacity_factor"] = args.capacity_factor
    if args.untied:
        model_d["tie_embeddings"] = False
    if args.no_renormalize:
        model_d["renormalize"] = False
    if args.total_steps is not None:
        train_d["steps"] = args.total_steps
    if args.warmup_steps is not None:
        train_d["warmup_steps"] = args.warmup_steps

    cfg = ref.ModelConfig.from_dict(model_d)
    tc = ref.TrainConfig.from_dict(train_d)
    model = ref.LoopMoERef(cfg)
    dtype = torch.float32 if args.dtype == "float32" else torch.float64

    # Perturbed parameters, stored as float32 (the dump's format); compute from those exact values.
    P = model.init_params(seed=args.seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(args.seed + 7919)
    for k in P:
        P[k] = P[k] + args.perturb * torch.randn(P[k].shape, generator=g, dtype=torch.float64)
    flat32 = model.flatten(P).to(torch.float32)
    P = model.params_from_flat(flat32.to(dtype).clone())

    B, T = args.batch, args.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g, dtype=torch.int64)
    inp, tgt = ref.split_tokens(tokens)

    out, grads = model.loss_and_grads(P, inp, tgt)
    losses, _, _ = ref.train_steps(model, P, inp, tgt, tc, args.steps)

    logits = out.logits.to(torch.float32)
    gflat = model.flatten(grads).to(torch.float32)
    dropped = out.dropped

    # Deliberate errors (negative tests)
    if args.corrupt_grad:
        name, fac = args.corrupt_grad.split("=")
        off, shape = next((o, s) for n, o, s in model.spec_offsets if n == name)
        gflat[off:off + ref.numel(shape)] *= float(fac)
    if args.corrupt_logits is not None:
        logits = logits * args.corrupt_logits
    if args.corrupt_train_loss:
        idx, fac = args.corrupt_train_loss.split("=")
        losses[int(idx)] *= float(fac)
    if args.corrupt_dropped is not None:
        dropped += args.corrupt_dropped

    os.makedirs(args.out, exist_ok=True)
    manifest = {
        "model": model_d,
        "train": train_d,
        "batch": B,
        "seq_len": T,
        "adam_steps": args.steps,
        "num_params": model.num_params,
        "params": [{"name": n, "offset": o, "shape": list(s)} for n, o, s in model.spec_offsets],
        "generator": "tests/reference/make_fake_dump.py",
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)
    flat32.numpy().astype("<f4").tofile(os.path.join(args.out, "params.bin"))
    tokens.numpy().astype("<i4").tofile(os.path.join(args.out, "tokens.bin"))
    logits.numpy().astype("<f4").tofile(os.path.join(args.out, "logits.bin"))
    gflat.numpy().astype("<f4").tofile(os.path.join(args.out, "grads.bin"))
    outputs = {"loss": out.loss.item(), "ce": out.ce.item(), "aux": out.aux.item(), "z": out.z.item(),
               "dropped": int(dropped), "train_losses": [float(x) for x in losses]}
    with open(os.path.join(args.out, "outputs.json"), "w") as fh:
        json.dump(outputs, fh, indent=1)
    print(f"wrote {args.out}: {cfg.iter_adaln} N={cfg.n_layers} R={cfg.n_loops} E={cfg.n_experts} "
          f"cf={cfg.capacity_factor} tied={cfg.tie_embeddings} B={B} T={T} K={args.steps} "
          f"P={model.num_params} loss={out.loss.item():.6f} dropped={dropped} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
