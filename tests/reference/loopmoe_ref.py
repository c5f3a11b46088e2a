#!/usr/bin/python3
"""LoopMoE reference model (PyTorch oracle), written from docs/MODEL.md.

This file is deliberately plain: one function per paragraph of MODEL.md, parameters held in an
ordered dict name -> tensor, autograd for the backward pass, AdamW written out by hand. It runs in
float64 (the oracle, tests/reference/check_parity.py) or float32 (the benchmark peer and the fake
dump used to self-test the oracle).

    /usr/bin/python3 tests/reference/loopmoe_ref.py --selftest     # internal consistency checks

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
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

IADALN_MODES = ("off", "iter", "token", "joint")
RMS_EPS = 1e-5
CLIP_EPS = 1e-6

Params = "OrderedDict[str, torch.Tensor]"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    vocab_size: int
    seq_len: int
    d_model: int
    n_heads: int
    head_dim: int
    n_layers: int
    n_loops: int
    n_experts: int
    top_k: int
    expert_hidden: int
    iter_adaln: str = "off"
    cond_dim: int = 0
    tie_embeddings: bool = True
    renormalize: bool = True
    capacity_factor: float = 0.0
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @staticmethod
    def from_dict(d: dict, **overrides) -> "ModelConfig":
        """Build from a manifest "model" dict or a TOML [model] table. Unknown keys are ignored
        (the oracle needs only the arithmetic-relevant ones); missing required keys raise."""
        d = dict(d)
        d.update({k: v for k, v in overrides.items() if v is not None})
        kw = {}
        for f in fields(ModelConfig):
            if f.name in d:
                kw[f.name] = d[f.name]
        cfg = ModelConfig(**kw)
        # normalise types (JSON/TOML may give ints for floats and vice versa)
        for name in ("vocab_size", "seq_len", "d_model", "n_heads", "head_dim", "n_layers", "n_loops",
                     "n_experts", "top_k", "expert_hidden", "cond_dim"):
            setattr(cfg, name, int(getattr(cfg, name)))
        for name in ("capacity_factor", "aux_loss_coef", "z_loss_coef", "rope_theta", "init_std"):
            setattr(cfg, name, float(getattr(cfg, name)))
        cfg.tie_embeddings = bool(cfg.tie_embeddings)
        cfg.renormalize = bool(cfg.renormalize)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        assert self.iter_adaln in IADALN_MODES, f"iter_adaln must be one of {IADALN_MODES}"
        assert self.head_dim % 2 == 0, "RoPE needs an even head_dim"
        assert 1 <= self.top_k <= self.n_experts
        if self.iter_adaln != "off":
            assert self.cond_dim > 0 and self.cond_dim % 2 == 0, "cond_dim must be even and > 0"
        assert self.capacity_factor >= 0.0

    @property
    def inner(self) -> int:  # I = H * hd
        return self.n_heads * self.head_dim


@dataclass
class TrainConfig:
    steps: int = 1000          # total_steps of the LR schedule
    lr: float = 3e-3           # lr_max
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 0.0
    batch_size: int = 16
    seed: int = 0

    @staticmethod
    def from_dict(d: dict, **overrides) -> "TrainConfig":
        d = dict(d)
        d.update({k: v for k, v in overrides.items() if v is not None})
        kw = {f.name: d[f.name] for f in fields(TrainConfig) if f.name in d}
        tc = TrainConfig(**kw)
        for name in ("steps", "warmup_steps", "batch_size", "seed"):
            setattr(tc, name, int(getattr(tc, name)))
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "grad_clip"):
            setattr(tc, name, float(getattr(tc, name)))
        return tc


def load_toml(path: str) -> dict:
    import tomllib
    with open(path, "rb") as fh:
        return tomllib.load(fh)


# --------------------------------------------------------------------------------------------
# Parameter layout (MODEL.md "Parameters and their order in the flat buffer")
# --------------------------------------------------------------------------------------------

def norm_block_spec(prefix: str, cfg: ModelConfig) -> List[Tuple[str, Tuple[int, ...]]]:
    d, dc = cfg.d_model, cfg.cond_dim
    iter_part = [(f"{prefix}.iter_w1", (dc, dc)), (f"{prefix}.iter_b1", (dc,)),
                 (f"{prefix}.iter_w2", (dc, dc)), (f"{prefix}.iter_b2", (dc,))]
    tok_part = [(f"{prefix}.tok_w", (d, dc))]
    mod_part = [(f"{prefix}.mod_w", (dc, 3 * d)), (f"{prefix}.mod_b", (3 * d,))]
    mode = cfg.iter_adaln
    if mode == "off":
        return [(f"{prefix}.weight", (d,))]
    if mode == "iter":
        return iter_part + mod_part
    if mode == "token":
        return tok_part + mod_part
    return iter_part + tok_part + mod_part  # joint


def param_spec(cfg: ModelConfig) -> List[Tuple[str, Tuple[int, ...]]]:
    V, d, I, E, f = cfg.vocab_size, cfg.d_model, cfg.inner, cfg.n_experts, cfg.expert_hidden
    spec: List[Tuple[str, Tuple[int, ...]]] = [("tok_emb", (V, d))]
    for n in range(cfg.n_layers):
        p = f"layers.{n}"
        spec += norm_block_spec(f"{p}.attn_norm", cfg)
        spec += [(f"{p}.attn.wqkv", (d, 3 * I)), (f"{p}.attn.wo", (I, d))]
        spec += norm_block_spec(f"{p}.ffn_norm", cfg)
        spec += [(f"{p}.moe.router", (d, E)),
                 (f"{p}.moe.w1", (E, d, f)), (f"{p}.moe.w3", (E, d, f)), (f"{p}.moe.w2", (E, f, d))]
    spec.append(("final_norm.weight", (d,)))
    if not cfg.tie_embeddings:
        spec.append(("lm_head", (d, V)))
    return spec


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def spec_with_offsets(spec) -> List[Tuple[str, int, Tuple[int, ...]]]:
    out, off = [], 0
    for name, shape in spec:
        out.append((name, off, tuple(shape)))
        off += numel(shape)
    return out


def is_decayed(shape: Sequence[int]) -> bool:
    """Weight decay applies to every tensor of rank >= 2 and to nothing else."""
    return len(shape) >= 2


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


# --------------------------------------------------------------------------------------------
# Self-test: cross-check pieces against independent, slower formulations and torch built-ins
# --------------------------------------------------------------------------------------------

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
        return selftest()
    if not args.spec and not args.selftest:
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
