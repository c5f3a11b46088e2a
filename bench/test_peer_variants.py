#!/usr/bin/python3
"""ctest bench.peer_variants: the benchmark peer's variants compute the reference's function.

    /usr/bin/python3 bench/test_peer_variants.py

1. In float64 on the CPU, bench/peer_model.py's grouped experts ("bmm" and "loop", the latter
   with the exact offsets torch._grouped_mm gets on a GPU) give the reference's loss and every
   gradient (relative 1e-10), on both tiny configs, dropless and with capacity 1.0 (drops), and
   scaled_dot_product_attention gives the reference's attention where torch has it. The
   "grouped_mm" branch runs with a stand-in for torch._grouped_mm that asserts the kernel's
   contract (bf16, int32 end offsets aligned to 8, the last one the row count).
2. bench/torch_peer.py --variant eager and --variant grouped report the same first and final
   losses on the CPU (float32, 2 steps), and --variant compile fails with one clear line where
   torch has no torch.compile.
What a CPU cannot check: torch._grouped_mm itself, bf16 autocast and torch.compile (scripts/gpu_check.sh compares
the variants' first losses on the GPU).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import loopmoe_ref as ref  # noqa: E402
import peer_model  # noqa: E402

failures = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok' if ok else 'FAILED'}: {name}: {detail}")
    if not ok:
        failures.append(name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(b.abs().max()), 1e-30)
    return float((a - b).abs().max()) / scale


def compare(config: str, capacity: float, attention: str, experts: str) -> None:
    conf = ref.load_toml(os.path.join(ROOT, "configs", config))
    cfg = ref.ModelConfig.from_dict(conf["model"], seq_len=32, capacity_factor=capacity)
    B, T = 2, 32
    base = ref.LoopMoERef(cfg)
    peer = peer_model.PeerModel(cfg, torch.device("cpu"), attention=attention, experts=experts)
    P = base.init_params(seed=5, dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    tok = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    inp, tgt = tok[:, :-1], tok[:, 1:]
    out_ref, grads_ref = base.loss_and_grads(P, inp, tgt)
    out_peer, grads_peer = peer.loss_and_grads(P, inp, tgt)
    loss_rel = abs(float(out_peer.loss) - float(out_ref.loss)) / abs(float(out_ref.loss))
    worst = max(((rel(grads_peer[k], grads_ref[k]), k) for k in grads_ref), default=(0.0, "-"))
    name = f"{config} capacity {capacity} attention {attention} experts {experts}"
    check(name, loss_rel < 1e-10 and worst[0] < 1e-10,
          f"loss {float(out_peer.loss):.12f} vs {float(out_ref.loss):.12f} (rel {loss_rel:.1e}), "
          f"worst gradient rel {worst[0]:.1e} ({worst[1]}); {out_ref.dropped} assignments dropped")


def check_grouped_mm_branch() -> None:
    """The experts="grouped_mm" branch with a stand-in for torch._grouped_mm that asserts the
    contract the GPU kernel has (bf16 operands, int32 end offsets whose last is the row count, 2D
    by 3D) and computes per group in float32: the loss is the reference's to bf16 precision."""
    calls = []

    def fake_grouped_mm(a, b, offs=None):
        assert a.dtype == b.dtype == torch.bfloat16, (a.dtype, b.dtype)
        assert a.dim() == 2 and b.dim() == 3 and a.shape[1] == b.shape[1], (a.shape, b.shape)
        assert offs.dtype == torch.int32 and offs.numel() == b.shape[0], offs
        assert int(offs[-1]) == a.shape[0], (int(offs[-1]), a.shape)
        assert all(int(e) % peer_model.ALIGN == 0 for e in offs), offs
        calls.append(a.shape[0])
        ys, begin = [], 0
        for e, end in enumerate(offs.tolist()):
            ys.append(a[begin:end].float() @ b[e].float())
            begin = end
        return torch.cat(ys).to(torch.bfloat16)

    had = hasattr(torch, "_grouped_mm")
    saved = getattr(torch, "_grouped_mm", None)
    torch._grouped_mm = fake_grouped_mm
    try:
        conf = ref.load_toml(os.path.join(ROOT, "configs", "loopmoe_tiny.toml"))
        cfg = ref.ModelConfig.from_dict(conf["model"], seq_len=32)
        base = ref.LoopMoERef(cfg)
        peer = peer_model.PeerModel(cfg, torch.device("cpu"), attention="ref", experts="grouped_mm")
        P = base.init_params(seed=5, dtype=torch.float32)
        tok = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))
        a = float(base.forward(P, tok[:, :-1], tok[:, 1:]).loss)
        b = float(peer.forward(P, tok[:, :-1], tok[:, 1:]).loss)
        r = abs(a - b) / abs(a)
        check("experts grouped_mm branch (stand-in kernel)", r < 1e-2 and len(calls) == 3 * cfg.n_layers * cfg.n_loops,
              f"loss {b:.6f} vs reference {a:.6f} (rel {r:.1e}, bf16 operands), {len(calls)} grouped products "
              f"of {calls[0] if calls else 0} rows")
    finally:
        if had:
            torch._grouped_mm = saved
        else:
            del torch._grouped_mm


def run_peer(*extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(HERE, "torch_peer.py"), "--config",
           os.path.join(ROOT, "configs", "loopmoe_tiny.toml"), "--steps", "1", "--warmup", "1",
           "--threads", "1", "--batch", "2", "--seq-len", "32", "--json", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def main() -> int:
    for config in ("vanilla_tiny.toml", "loopmoe_tiny.toml"):
        for capacity in (0.0, 1.0):
            for experts in ("bmm", "loop"):
                compare(config, capacity, "ref", experts)
    check_grouped_mm_branch()
    if peer_model.has_sdpa():
        compare("loopmoe_tiny.toml", 0.0, "sdpa", "ref")
    else:
        print(f"skipped: scaled_dot_product_attention (torch {torch.__version__} has none)")
    check("experts auto on the CPU", peer_model.resolve_experts("auto", torch.device("cpu")) == "bmm",
          "resolves to bmm")

    results = {}
    for variant in ("eager", "grouped"):
        p = run_peer("--variant", variant)
        ok = p.returncode == 0
        results[variant] = json.loads(p.stdout.strip().splitlines()[-1]) if ok else {}
        check(f"torch_peer.py --variant {variant}", ok, f"exit {p.returncode} {p.stderr.strip()[-300:]}")
    if results.get("eager") and results.get("grouped"):
        e, g = results["eager"], results["grouped"]
        same = (abs(e["first_loss"] - g["first_loss"]) <= 1e-5 * abs(e["first_loss"])
                and abs(e["final_loss"] - g["final_loss"]) <= 1e-4 * abs(e["final_loss"]))
        check("eager and grouped losses", same,
              f"first {e['first_loss']} vs {g['first_loss']}, final {e['final_loss']} vs {g['final_loss']} "
              f"(grouped: {g['experts']}, {g['attention']})")
    p = run_peer("--variant", "compile")
    if hasattr(torch, "compile"):
        check("torch_peer.py --variant compile", p.returncode == 0, f"exit {p.returncode}")
    else:
        lines = p.stderr.strip().splitlines()
        check("torch_peer.py --variant compile without torch.compile",
              p.returncode == 2 and len(lines) == 1 and "needs torch.compile" in lines[0],
              f"exit {p.returncode}: {p.stderr.strip()}")
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
