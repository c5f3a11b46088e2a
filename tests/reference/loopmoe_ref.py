#!/usr/bin/python3
"""LoopMoE reference model (PyTorch oracle), written from docs/MODEL.md.

This file is deliberately plain: one function per paragraph of MODEL.md, parameters held in an
ordered dict name -> tensor, autograd for the backward pass, AdamW written out by hand. It runs in
float64 (the oracle, tests/reference/check_parity.py) or float32 (the benchmark peer and the fake
dump used to self-test the oracle).

    /usr/bin/python3 tests/reference/loopmoe_ref.py --selftest     # internal consistency checks

ref_config.py holds the configuration and parameter layout, ref_selftest.py the self-test.

Public API (used by check_parity.py, make_fake_dump.py, bench/torch_peer.py):
    ModelConfig.from_dict(d) / load_toml(path)       config from a manifest "model" dict or TOML file
    param_spec(cfg)                                  [(name, shape)] in the MODEL.md flat order
    LoopMoERef(cfg)                                  .spec, .num_params, .init_params(), .params_from_flat(),
                                                     .flatten(), .forward(), .loss_and_grads()
    TrainConfig.from_dict(d), lr_at(s, tc), clip_grads_(grads, clip), AdamW(...), train_steps(...)
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

# Configuration and the flat parameter layout live in ref_config.py; re-exported here, the public
# API's one module.
from ref_config import (IADALN_MODES, ModelConfig, TrainConfig, is_decayed,  # noqa: F401
                        load_toml, norm_block_spec, numel, param_spec, spec_with_offsets)

RMS_EPS = 1e-5
CLIP_EPS = 1e-6

Params = "OrderedDict[str, torch.Tensor]"


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

def rmsnorm(x: torch.Tensor) -> torch.Tensor:
    """x_t / sqrt(mean_j x_tj^2 + 1e-5), no gain."""
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + RMS_EPS)


def silu(z: torch.Tensor) -> torch.Tensor:
    """z * sigmoid(z) (torch's fused kernel computes exactly this)."""
    return F.silu(z)


def iteration_pe(r: int, dc: int, dtype) -> torch.Tensor:
    """pe[2i] = sin(r * 10000^(-2i/dc)), pe[2i+1] = cos(r * 10000^(-2i/dc)). Computed in float64."""
    pe = torch.empty(dc, dtype=torch.float64)
    for i in range(dc // 2):
        a = r * 10000.0 ** (-2.0 * i / dc)
        pe[2 * i] = math.sin(a)
        pe[2 * i + 1] = math.cos(a)
    return pe.to(dtype)


def rope_tables(T: int, hd: int, theta: float, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of theta_i = p * rope_theta^(-2i/hd), shape [T, hd/2], computed in float64."""
    i = torch.arange(hd // 2, dtype=torch.float64)
    inv = theta ** (-2.0 * i / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, hd]; interleaved pairs (x[2i], x[2i+1]) rotated by theta_i(p)."""
    a, b = x.unflatten(-1, (x.shape[-1] // 2, 2)).unbind(-1)   # a = x[2i], b = x[2i+1]
    ra = a * cos - b * sin
    rb = a * sin + b * cos
    return torch.stack((ra, rb), dim=-1).flatten(-2)


@dataclass
class ForwardOutput:
    logits: torch.Tensor            # [S, V]
    ce: torch.Tensor                # scalar
    aux: torch.Tensor               # mean_a aux_a
    z: torch.Tensor                 # mean_a z_a
    loss: torch.Tensor              # total
    dropped: int                    # dropped assignments, summed over all N*R MoE applications
    min_margin: float               # smallest p_(k) - p_(k+1) over all tokens/applications (inf if k == E)
    expert_counts: List[torch.Tensor]  # per application, assignments per expert before drops


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

class LoopMoERef:
    def __init__(self, cfg: ModelConfig):
        cfg.validate()
        self.cfg = cfg
        self.spec = param_spec(cfg)
        self.spec_offsets = spec_with_offsets(self.spec)
        self.num_params = sum(numel(s) for _, s in self.spec)
        self._rope_cache: Dict[Tuple[int, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._pe_cache: Dict[Tuple[int, torch.dtype], torch.Tensor] = {}
        self._mask_cache: Dict[int, torch.Tensor] = {}

    # ---- parameters ------------------------------------------------------------------------
    def init_params(self, seed: int = 0, dtype=torch.float32) -> "OrderedDict[str, torch.Tensor]":
        """MODEL.md "Initialisation" (engine-style; the oracle itself always loads weights)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(seed)
        std = cfg.init_std
        std_out = cfg.init_std / math.sqrt(2 * cfg.n_layers * cfg.n_loops)
        out = OrderedDict()
        for name, shape in self.spec:
            leaf = name.split(".")[-1]
            if leaf in ("wo", "w2"):
                t = torch.randn(shape, generator=g, dtype=torch.float64) * std_out
            elif leaf in ("tok_emb", "wqkv", "router", "w1", "w3", "lm_head", "tok_w", "iter_w1", "iter_w2"):
                t = torch.randn(shape, generator=g, dtype=torch.float64) * std
            elif leaf == "weight":
                t = torch.ones(shape, dtype=torch.float64)
            elif leaf in ("iter_b1", "iter_b2", "mod_w", "mod_b"):
                t = torch.zeros(shape, dtype=torch.float64)
            else:
                raise AssertionError(f"no init rule for {name}")
            out[name] = t.to(dtype)
        return out

    def check_manifest_params(self, manifest_params: List[dict], num_params: Optional[int] = None) -> None:
        """Assert the manifest's (name, offset, shape) list equals the layout MODEL.md implies."""
        got = [(p["name"], int(p["offset"]), tuple(int(s) for s in p["shape"])) for p in manifest_params]
        want = self.spec_offsets
        if got != want:
            lines = [f"parameter layout mismatch (manifest has {len(got)} entries, spec {len(want)}):"]
            for i in range(max(len(got), len(want))):
                a = got[i] if i < len(got) else None
                b = want[i] if i < len(want) else None
                if a != b:
                    lines.append(f"  #{i}: manifest={a} spec={b}")
                    if len(lines) > 12:
                        break
            raise AssertionError("\n".join(lines))
        if num_params is not None:
            assert int(num_params) == self.num_params, f"num_params {num_params} != spec {self.num_params}"

    def params_from_flat(self, flat: torch.Tensor, manifest_params: Optional[List[dict]] = None
                         ) -> "OrderedDict[str, torch.Tensor]":
        """Views into `flat` (gradients flow back to it). If a manifest list is given, it must match."""
        if manifest_params is not None:
            self.check_manifest_params(manifest_params)
        assert flat.dim() == 1 and flat.numel() == self.num_params, \
            f"flat buffer has {flat.numel()} values, spec needs {self.num_params}"
        out = OrderedDict()
        for name, off, shape in self.spec_offsets:
            out[name] = flat.narrow(0, off, numel(shape)).view(shape)
        return out

    def flatten(self, tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[name].reshape(-1) for name, _ in self.spec])

    # ---- cached constants ---------------------------------------------------------------------
    def _rope(self, T: int, dtype):
        key = (T, dtype)
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(T, self.cfg.head_dim, self.cfg.rope_theta, dtype)
        return self._rope_cache[key]

    def _pe(self, r: int, dtype):
        key = (r, dtype)
        if key not in self._pe_cache:
            self._pe_cache[key] = iteration_pe(r, self.cfg.cond_dim, dtype)
        return self._pe_cache[key]

    def _causal_mask(self, T: int) -> torch.Tensor:
        if T not in self._mask_cache:
            self._mask_cache[T] = torch.ones(T, T, dtype=torch.bool).triu(1)  # True where s > p
        return self._mask_cache[T]

    # ---- sublayers ----------------------------------------------------------------------------
    def residual(self, P: Dict[str, torch.Tensor], prefix: str, x: torch.Tensor, r: int, sublayer):
        """Norm block with residual (MODEL.md "Norm block with residual")."""
        mode = self.cfg.iter_adaln
        d = self.cfg.d_model
        if mode == "off":
            u = rmsnorm(x) * P[f"{prefix}.weight"]
            return x + sublayer(u)
        n = rmsnorm(x)
        c = None
        if mode in ("iter", "joint"):
            pe = self._pe(r, x.dtype)
            e = silu(pe @ P[f"{prefix}.iter_w1"] + P[f"{prefix}.iter_b1"]) @ P[f"{prefix}.iter_w2"] \
                + P[f"{prefix}.iter_b2"]                              # [d_c], same for every token
            c = e
        if mode in ("token", "joint"):
            ct = n @ P[f"{prefix}.tok_w"]                             # [S, d_c]
            c = ct if c is None else c + ct
        m = silu(c) @ P[f"{prefix}.mod_w"] + P[f"{prefix}.mod_b"]     # [S, 3d] or [3d]
        shift, scale, gate = m.split(d, dim=-1)                      # m[0:d], m[d:2d], m[2d:3d]
        u = n * (1 + scale) + shift
        return x + (1 + gate) * sublayer(u)

    def attention(self, P, prefix: str, u: torch.Tensor, B: int, T: int) -> torch.Tensor:
        H, hd, I = self.cfg.n_heads, self.cfg.head_dim, self.cfg.inner
        qkv = u @ P[f"{prefix}.wqkv"]                                 # [S, 3I]

        def heads(t):                                                 # [S, I] -> [B, H, T, hd]
            return t.reshape(B, T, H, hd).transpose(1, 2)

        q, k, v = (heads(t) for t in qkv.split(I, dim=1))             # columns [0,I), [I,2I), [2I,3I)
        cos, sin = self._rope(T, u.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)               # [B, H, T, T]
        att = att.masked_fill(self._causal_mask(T), float("-inf"))
        att = torch.softmax(att, dim=-1)
        o = att @ v                                                   # [B, H, T, hd]
        o = o.transpose(1, 2).reshape(B * T, I)                       # heads concatenated in order
        return o @ P[f"{prefix}.wo"]

    def moe(self, P, prefix: str, u: torch.Tensor, stats: dict) -> torch.Tensor:
        cfg = self.cfg
        S = u.shape[0]
        E, k = cfg.n_experts, cfg.top_k
        rlogits = u @ P[f"{prefix}.router"]                           # [S, E]
        probs = torch.softmax(rlogits, dim=-1)

        # Top-k: largest probs, ties to the lower expert index, descending (stable sort does both).
        with torch.no_grad():
            sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
            top_idx = order[:, :k]                                    # [S, k], rank 0 = largest
            if k < E:
                margin = (sorted_p[:, k - 1] - sorted_p[:, k]).min().item()
                stats["min_margin"] = min(stats["min_margin"], margin)
        top_p = probs.gather(1, top_idx)                              # gradient flows into probs
        w = top_p / top_p.sum(dim=-1, keepdim=True) if cfg.renormalize else top_p

        # Capacity: visit assignments in order (t, j); each expert keeps its first C.
        with torch.no_grad():
            flat_e = top_idx.reshape(-1)                              # index t*k + j
            counts = torch.bincount(flat_e, minlength=E)              # before drops
            if cfg.capacity_factor > 0:
                C = math.ceil(cfg.capacity_factor * S * k / E)
                onehot = F.one_hot(flat_e, E)                         # [S*k, E]
                pos = (onehot.cumsum(0) * onehot).sum(-1) - 1         # position within its expert
                keep = pos < C
            else:
                keep = torch.ones_like(flat_e, dtype=torch.bool)
            stats["dropped"] += int((~keep).sum().item())
            stats["counts"].append(counts.clone())
            kept = keep.nonzero().squeeze(1)
            kept_e = flat_e[kept]
            grp = torch.argsort(kept_e, stable=True)
            sel = kept[grp]                                           # assignment ids grouped by expert
            tok = torch.div(sel, k, rounding_mode="floor")
            kept_counts = torch.bincount(kept_e, minlength=E).tolist()

        w_sel = w.reshape(-1)[sel]                                    # [n_kept]
        # unbind: per-expert [d, f] / [f, d] views whose backward is one stack (not E full-size adds)
        W1, W3, W2 = (P[f"{prefix}.{w}"].unbind(0) for w in ("w1", "w3", "w2"))
        ys = []
        start = 0
        for e in range(E):
            n_e = kept_counts[e]
            if n_e == 0:
                continue
            t_e = tok[start:start + n_e]
            v = u.index_select(0, t_e)
            y = (silu(v @ W1[e]) * (v @ W3[e])) @ W2[e]
            ys.append(y)
            start += n_e
        out = torch.zeros_like(u)
        if ys:
            y_all = torch.cat(ys, 0) * w_sel[:, None]
            out = out.index_add(0, tok, y_all)

        # Auxiliary losses for this application.
        f_i = counts.to(u.dtype) / (S * k)                            # constant
        P_i = probs.mean(dim=0)
        stats["aux"].append(E * (f_i * P_i).sum())
        stats["z"].append((torch.logsumexp(rlogits, dim=-1) ** 2).mean())
        return out

    # ---- full forward -------------------------------------------------------------------------
    def forward(self, P: Dict[str, torch.Tensor], tokens: torch.Tensor,
                targets: Optional[torch.Tensor] = None) -> ForwardOutput:
        """tokens, targets: [B, T] int64. Returns logits [B*T, V] and the loss terms."""
        cfg = self.cfg
        B, T = tokens.shape
        x = P["tok_emb"].index_select(0, tokens.reshape(-1))          # [S, d]
        stats = {"aux": [], "z": [], "dropped": 0, "min_margin": float("inf"), "counts": []}
        for r in range(cfg.n_loops):
            for n in range(cfg.n_layers):
                p = f"layers.{n}"
                x = self.residual(P, f"{p}.attn_norm", x, r,
                                  lambda u, p=p: self.attention(P, f"{p}.attn", u, B, T))
                x = self.residual(P, f"{p}.ffn_norm", x, r,
                                  lambda u, p=p: self.moe(P, f"{p}.moe", u, stats))
        h = rmsnorm(x) * P["final_norm.weight"]
        logits = h @ (P["tok_emb"].t() if cfg.tie_embeddings else P["lm_head"])
        aux = torch.stack(stats["aux"]).mean()
        z = torch.stack(stats["z"]).mean()
        if targets is not None:
            ce = F.cross_entropy(logits, targets.reshape(-1))
            loss = ce + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
        else:
            ce = loss = torch.full((), float("nan"), dtype=logits.dtype)
        return ForwardOutput(logits, ce, aux, z, loss, stats["dropped"], stats["min_margin"],
                             stats["counts"])

    def loss_and_grads(self, P: Dict[str, torch.Tensor], tokens, targets
                       ) -> Tuple[ForwardOutput, "OrderedDict[str, torch.Tensor]"]:
        """Forward + autograd. P's tensors are used as-is (copied to fresh leaves)."""
        leaves = OrderedDict((k, v.detach().clone().requires_grad_(True)) for k, v in P.items())
        out = self.forward(leaves, tokens, targets)
        gs = torch.autograd.grad(out.loss, list(leaves.values()), allow_unused=True)
        grads = OrderedDict()
        for (name, t), g in zip(leaves.items(), gs):
            grads[name] = torch.zeros_like(t) if g is None else g.detach()
        out.logits = out.logits.detach()
        for a in ("ce", "aux", "z", "loss"):
            setattr(out, a, getattr(out, a).detach())
        return out, grads


# --------------------------------------------------------------------------------------------
# Optimiser (MODEL.md "Optimiser")
# --------------------------------------------------------------------------------------------

def lr_at(s: int, tc: TrainConfig) -> float:
    """Learning rate for 0-based step s."""
    lr_max = tc.lr
    if s < tc.warmup_steps:
        return lr_max * (s + 1) / tc.warmup_steps
    q = (s - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    q = min(q, 1.0)
    lr_min = tc.min_lr_ratio * lr_max
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(math.pi * q))


def global_grad_norm(grads: Dict[str, torch.Tensor]) -> float:
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()


def clip_grads_(grads: Dict[str, torch.Tensor], max_norm: float) -> float:
    """Like torch.nn.utils.clip_grad_norm_ (norm + 1e-6); in place. Returns the pre-clip norm G."""
    G = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    if max_norm > 0:
        coef = max_norm / (G + CLIP_EPS)
        if coef < 1:
            for g in grads.values():
                g.mul_(coef)
    return float(G)


class AdamW:
    """Hand-written AdamW; decoupled decay (wd on rank >= 2 tensors only) inside the lr product:
    p <- p - lr * (mhat / (sqrt(vhat) + eps) + wd_p * p)."""

    def __init__(self, params: Dict[str, torch.Tensor], tc: TrainConfig):
        self.tc = tc
        self.m = OrderedDict((k, torch.zeros_like(v)) for k, v in params.items())
        self.v = OrderedDict((k, torch.zeros_like(v)) for k, v in params.items())
        self.t = 0

    @torch.no_grad()
    def update(self, params: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor], lr: float) -> None:
        tc = self.tc
        self.t += 1
        b1, b2 = tc.beta1, tc.beta2
        bc1 = 1.0 - b1 ** self.t
        bc2 = 1.0 - b2 ** self.t
        for name, p in params.items():
            g = grads[name]
            m, v = self.m[name], self.v[name]
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            mhat = m / bc1
            vhat = v / bc2
            wd = tc.weight_decay if is_decayed(p.shape) else 0.0
            p.sub_(lr * (mhat / (vhat.sqrt() + tc.eps) + wd * p))


def train_steps(model: LoopMoERef, params: Dict[str, torch.Tensor], tokens, targets, tc: TrainConfig,
                K: int, on_step=None) -> Tuple[List[float], "OrderedDict[str, torch.Tensor]", float]:
    """K AdamW steps on the same batch. Returns (losses before each step, final params, min margin)."""
    P = OrderedDict((k, v.detach().clone()) for k, v in params.items())
    opt = AdamW(P, tc)
    losses = []
    min_margin = float("inf")
    for s in range(K):
        out, grads = model.loss_and_grads(P, tokens, targets)
        losses.append(out.loss.item())
        min_margin = min(min_margin, out.min_margin)
        G = clip_grads_(grads, tc.grad_clip)
        lr = lr_at(s, tc)
        opt.update(P, grads, lr)
        if on_step is not None:
            on_step(s, out, G, lr)
    return losses, P, min_margin


def split_tokens(tokens_bt1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """tokens.bin layout [B, T+1] -> inputs [:, :T], targets [:, 1:] (int64)."""
    t = tokens_bt1.long()
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--selftest", action="store_true", help="run internal consistency checks")
    ap.add_argument("--spec", metavar="TOML", help="print the parameter layout of a config")
    ap.add_argument("--iter-adaln", choices=IADALN_MODES)
    args = ap.parse_args(argv)
    if args.spec:
        cfg = ModelConfig.from_dict(load_toml(args.spec)["model"], iter_adaln=args.iter_adaln)
        m = LoopMoERef(cfg)
        for name, off, shape in m.spec_offsets:
            print(f"{off:>10d}  {name:<28s} {list(shape)}")
        print(f"num_params = {m.num_params}")
    if args.selftest:
        from ref_selftest import selftest  # here: ref_selftest imports this module
        return selftest()
    if not args.spec and not args.selftest:
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
