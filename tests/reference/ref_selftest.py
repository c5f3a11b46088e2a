"""LoopMoE reference (PyTorch oracle): its self-test.

Cross-checks the pieces of loopmoe_ref.py against independent, slower formulations and torch
built-ins. Run through `loopmoe_ref.py --selftest`.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

from loopmoe_ref import (IADALN_MODES, AdamW, LoopMoERef, ModelConfig, TrainConfig, apply_rope,
                         clip_grads_, lr_at, rope_tables, silu)

def _micro_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=13, seq_len=8, d_model=8, n_heads=2, head_dim=4, n_layers=2, n_loops=2,
                n_experts=5, top_k=2, expert_hidden=6, iter_adaln="joint", cond_dim=4,
                tie_embeddings=True, renormalize=True, capacity_factor=0.0, aux_loss_coef=0.01,
                z_loss_coef=0.001, rope_theta=10000.0, init_std=0.02)
    base.update(kw)
    return ModelConfig.from_dict(base)


def _perturbed(model: LoopMoERef, seed: int, dtype=torch.float64, scale=0.3):
    P = model.init_params(seed, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    for k in P:
        P[k] = P[k] + scale * torch.randn(P[k].shape, generator=g, dtype=torch.float64).to(dtype)
    return P


def _naive_moe(model: LoopMoERef, P, prefix, u):
    """Per-token Python loop, dense per-expert evaluation; independent of the vectorised path."""
    cfg = model.cfg
    S, E, k = u.shape[0], cfg.n_experts, cfg.top_k
    probs = torch.softmax(u @ P[f"{prefix}.router"], -1)
    C = math.ceil(cfg.capacity_factor * S * k / E) if cfg.capacity_factor > 0 else None
    used = [0] * E
    out = []
    dropped = 0
    for t in range(S):
        pl = probs[t].tolist()
        idx = sorted(range(E), key=lambda e: (-pl[e], e))[:k]
        tot = sum(probs[t, e] for e in idx)
        acc = torch.zeros_like(u[t])
        for e in idx:
            wgt = probs[t, e] / tot if cfg.renormalize else probs[t, e]
            if C is not None:
                if used[e] >= C:
                    dropped += 1
                    continue
                used[e] += 1
            v = u[t]
            acc = acc + wgt * ((silu(v @ P[f"{prefix}.w1"][e]) * (v @ P[f"{prefix}.w3"][e])) @ P[f"{prefix}.w2"][e])
        out.append(acc)
    return torch.stack(out), dropped


def selftest() -> int:
    torch.manual_seed(0)
    ok = True

    def check(name, cond, detail=""):
        nonlocal ok
        print(f"  [{'ok' if cond else 'FAIL'}] {name} {detail}")
        ok = ok and bool(cond)

    print("selftest:")
    # 1. top-k tie rule
    p = torch.tensor([[0.1, 0.3, 0.3, 0.3, 0.0]], dtype=torch.float64)
    _, order = torch.sort(p, dim=-1, descending=True, stable=True)
    check("stable sort ties -> lower index", order[0, :2].tolist() == [1, 2])

    # 2. RoPE vs complex multiplication
    T, hd = 7, 6
    x = torch.randn(T, hd, dtype=torch.float64)
    cos, sin = rope_tables(T, hd, 10000.0, torch.float64)
    z = torch.view_as_complex(x.reshape(T, hd // 2, 2).contiguous())
    ang = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-2.0 * torch.arange(hd // 2) / hd)
    ref = torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)).reshape(T, hd)
    check("rope == complex rotation", torch.allclose(apply_rope(x, cos, sin), ref, atol=1e-12))

    # 3. attention vs naive loops
    cfg = _micro_cfg()
    model = LoopMoERef(cfg)
    P = _perturbed(model, 3)
    B, T = 2, 5
    u = torch.randn(B * T, cfg.d_model, dtype=torch.float64)
    a = model.attention(P, "layers.0.attn", u, B, T)
    qkv = u @ P["layers.0.attn.wqkv"]
    I, hd = cfg.inner, cfg.head_dim
    o = torch.zeros(B * T, I, dtype=torch.float64)
    for b in range(B):
        for j in range(cfg.n_heads):
            def rot(vec, pos):
                res = vec.clone()
                for i in range(hd // 2):
                    th = pos * cfg.rope_theta ** (-2.0 * i / hd)
                    res[2 * i] = vec[2 * i] * math.cos(th) - vec[2 * i + 1] * math.sin(th)
                    res[2 * i + 1] = vec[2 * i] * math.sin(th) + vec[2 * i + 1] * math.cos(th)
                return res
            for pp in range(T):
                q = rot(qkv[b * T + pp, j * hd:(j + 1) * hd], pp)
                sc = []
                for s in range(pp + 1):
                    kk = rot(qkv[b * T + s, I + j * hd:I + (j + 1) * hd], s)
                    sc.append((q @ kk) / math.sqrt(hd))
                att = torch.softmax(torch.stack(sc), 0)
                for s in range(pp + 1):
                    o[b * T + pp, j * hd:(j + 1) * hd] += att[s] * qkv[b * T + s, 2 * I + j * hd:2 * I + (j + 1) * hd]
    check("attention == naive loops", torch.allclose(a, o @ P["layers.0.attn.wo"], atol=1e-12))

    # 4. MoE vs naive per-token loop, dropless and with capacity (with drops)
    for cf, renorm in ((0.0, True), (0.0, False), (1.0, True), (0.6, False)):
        cfg = _micro_cfg(capacity_factor=cf, renormalize=renorm)
        model = LoopMoERef(cfg)
        P = _perturbed(model, 4, scale=1.0)
        u = torch.randn(24, cfg.d_model, dtype=torch.float64)
        stats = {"aux": [], "z": [], "dropped": 0, "min_margin": float("inf"), "counts": []}
        y = model.moe(P, "layers.1.moe", u, stats)
        yn, dn = _naive_moe(model, P, "layers.1.moe", u)
        check(f"moe == naive (cf={cf}, renorm={renorm})",
              torch.allclose(y, yn, atol=1e-12) and dn == stats["dropped"], f"dropped={dn}")

    # 5. full-model gradient vs finite differences (every mode, tied/untied, capacity)
    for mode in IADALN_MODES:
        for tied, cf in ((True, 0.0), (False, 1.0)):
            cfg = _micro_cfg(iter_adaln=mode, tie_embeddings=tied, capacity_factor=cf)
            model = LoopMoERef(cfg)
            P = _perturbed(model, 5, scale=0.3)
            flat = model.flatten(P).detach()
            g = torch.Generator().manual_seed(9)
            tok = torch.randint(0, cfg.vocab_size, (2, 6), generator=g)
            tgt = torch.randint(0, cfg.vocab_size, (2, 6), generator=g)
            out, grads = model.loss_and_grads(model.params_from_flat(flat), tok, tgt)
            gflat = model.flatten(grads)
            dirv = torch.randn(flat.shape, generator=g, dtype=torch.float64)
            h = 1e-6
            lp = model.forward(model.params_from_flat(flat + h * dirv), tok, tgt).loss.item()
            lm = model.forward(model.params_from_flat(flat - h * dirv), tok, tgt).loss.item()
            fd = (lp - lm) / (2 * h)
            an = (gflat @ dirv).item()
            check(f"directional grad vs FD mode={mode} tied={tied} cf={cf}",
                  abs(fd - an) <= 1e-6 * max(1.0, abs(an)), f"fd={fd:.9g} an={an:.9g} dropped={out.dropped}")
            # every tensor carries gradient
            zero = [k for k, v in grads.items() if v.abs().max() == 0]
            check(f"  every tensor has nonzero grad", not zero, str(zero))

    # 6. AdamW / clipping vs torch built-ins
    tc = TrainConfig(steps=20, lr=1e-2, min_lr_ratio=0.1, warmup_steps=3, weight_decay=0.1,
                     beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=0.5)
    shapes = {"a": (3, 4), "b": (4,), "c": (2, 3, 2)}
    P1 = OrderedDict((k, torch.randn(s, dtype=torch.float64)) for k, s in shapes.items())
    P2 = OrderedDict((k, v.clone().requires_grad_(True)) for k, v in P1.items())
    mine = AdamW(P1, tc)
    theirs = torch.optim.AdamW([
        {"params": [P2[k] for k in shapes if len(shapes[k]) >= 2], "weight_decay": tc.weight_decay},
        {"params": [P2[k] for k in shapes if len(shapes[k]) < 2], "weight_decay": 0.0}],
        lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    for s in range(6):
        G = OrderedDict((k, torch.randn(sh, dtype=torch.float64)) for k, sh in shapes.items())
        G1 = OrderedDict((k, v.clone()) for k, v in G.items())
        n1 = clip_grads_(G1, tc.grad_clip)
        for k in shapes:
            P2[k].grad = G[k].clone()
        n2 = torch.nn.utils.clip_grad_norm_([P2[k] for k in shapes], tc.grad_clip)
        lr = lr_at(s, tc)
        for grp in theirs.param_groups:
            grp["lr"] = lr
        mine.update(P1, G1, lr)
        theirs.step()
        check(f"adamw+clip step {s} == torch (lr={lr:.6g})",
              abs(n1 - float(n2)) < 1e-12 and all(torch.allclose(P1[k], P2[k].detach(), atol=1e-14, rtol=1e-12)
                                                 for k in shapes))

    # 7. LR schedule spot values
    tc = TrainConfig(steps=10, lr=1.0, min_lr_ratio=0.1, warmup_steps=2)
    want = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 8)), None, None, None, None, None, 0.1 + 0.45 * (1 + math.cos(math.pi * 7 / 8)), 0.1, 0.1]
    got = [lr_at(s, tc) for s in range(12)]
    check("lr schedule", all(w is None or abs(w - g) < 1e-15 for w, g in zip(want, got)),
          " ".join(f"{g:.4f}" for g in got))

    print("selftest", "PASSED" if ok else "FAILED")
    return 0 if ok else 1
