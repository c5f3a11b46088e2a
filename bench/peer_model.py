"""The benchmark peer's model variants beyond the reference (bench/torch_peer.py --variant).

The PyTorch reference (tests/reference/loopmoe_ref.py) is the oracle: a per-expert loop whose
routing reads counts back to the host (.item(), .tolist()), causal attention written out over the
full T x T block, constants built on the CPU. `PeerModel` is the same function, parameter layout
and initialisation, made to run on any device and, where asked, the way fast PyTorch MoE code
does it:

- attention "sdpa": torch.nn.functional.scaled_dot_product_attention(is_causal=True) (flash or
  memory-efficient attention on a GPU) instead of the written-out softmax(QK^T)V;
- experts "grouped" (torchtitan's layout): the (token, slot) assignments sorted by expert into one
  buffer whose groups start at multiples of ALIGN rows (zero rows pad each group; every group has
  at least ALIGN rows, the last one takes the slack so the buffer has a fixed size S*k + E*ALIGN),
  then ONE grouped matrix product per weight over all experts, with no host round trip:
    "grouped_mm": torch._grouped_mm(x [rows, d] bf16, W [E, d, f] bf16, offs int32 [E]),
    "loop":       the same offsets, one matmul per group (a CPU stand-in to test the layout),
    "bmm":        every group padded to the largest (one host read of it), torch.bmm [E, cap, d];
  "auto" picks grouped_mm on a CUDA device where torch has it, else bmm.
The routing (softmax, the reference's stable-sort top-k, renormalisation, capacity, load-balance
and z losses) is the reference's; the grouped path does not count dropped assignments or the
top-k margin (stats["dropped"] stays 0), which would need a host read.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import loopmoe_ref as ref

ALIGN = 8  # rows per group alignment: torchtitan's TOKEN_GROUP_ALIGN_SIZE_M for bf16


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


def has_sdpa() -> bool:
    return hasattr(F, "scaled_dot_product_attention")


def resolve_experts(impl: str, device: torch.device) -> str:
    if impl != "auto":
        return impl
    return "grouped_mm" if device.type == "cuda" and has_grouped_mm() else "bmm"


def resolve_attention(attention: str) -> str:
    if attention == "sdpa" and not has_sdpa():
        raise SystemExit(f"torch_peer: --attention sdpa needs torch >= 2.0 (this is torch {torch.__version__})")
    if attention == "auto":
        return "sdpa" if has_sdpa() else "ref"
    return attention


class PeerModel(ref.LoopMoERef):
    """LoopMoERef on `device`, with `attention` in ("ref", "sdpa") and `experts` in ("ref",
    "grouped_mm", "loop", "bmm")."""

    def __init__(self, cfg, device: torch.device, attention: str = "ref", experts: str = "ref"):
        super().__init__(cfg)
        assert attention in ("ref", "sdpa"), attention
        assert experts in ("ref", "grouped_mm", "loop", "bmm"), experts
        self.device = device
        self.attention_impl = attention
        self.experts_impl = experts
        self._dev_rope = {}
        self._dev_pe = {}
        self._dev_mask = {}

    # ---- the reference's cached constants, on the device ------------------------------------
    def _rope(self, T: int, dtype):
        key = (T, dtype)
        if key not in self._dev_rope:
            cos, sin = ref.rope_tables(T, self.cfg.head_dim, self.cfg.rope_theta, dtype)
            self._dev_rope[key] = (cos.to(self.device), sin.to(self.device))
        return self._dev_rope[key]

    def _pe(self, r: int, dtype):
        key = (r, dtype)
        if key not in self._dev_pe:
            self._dev_pe[key] = ref.iteration_pe(r, self.cfg.cond_dim, dtype).to(self.device)
        return self._dev_pe[key]

    def _causal_mask(self, T: int):
        if T not in self._dev_mask:
            self._dev_mask[T] = torch.ones(T, T, dtype=torch.bool).triu(1).to(self.device)
        return self._dev_mask[T]

    def warm_constants(self, T: int, dtype=torch.float32) -> None:
        """Builds every cached constant now (torch.compile then traces plain lookups)."""
        self._rope(T, dtype)
        self._causal_mask(T)
        if self.cfg.iter_adaln in ("iter", "joint"):
            for r in range(self.cfg.n_loops):
                self._pe(r, dtype)

    # ---- attention ----------------------------------------------------------------------------
    def attention(self, P, prefix: str, u: torch.Tensor, B: int, T: int) -> torch.Tensor:
        if self.attention_impl == "ref":
            return super().attention(P, prefix, u, B, T)
        H, hd, I = self.cfg.n_heads, self.cfg.head_dim, self.cfg.inner
        qkv = u @ P[f"{prefix}.wqkv"]

        def heads(t):
            return t.reshape(B, T, H, hd).transpose(1, 2)

        q, k, v = (heads(t) for t in qkv.split(I, dim=1))
        cos, sin = self._rope(T, u.dtype)
        q, k = ref.apply_rope(q, cos, sin), ref.apply_rope(k, cos, sin)
        if q.dtype != v.dtype:  # RoPE's float32 tables promote q, k (autocast casts them back)
            q, k = q.to(v.dtype), k.to(v.dtype)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(hd)
        o = o.transpose(1, 2).reshape(B * T, I)
        return o @ P[f"{prefix}.wo"]

    # ---- MoE ----------------------------------------------------------------------------------
    def _layout(self, kept_counts: torch.Tensor, assignments: int):
        """Group starts [E] (int64), buffer rows (int) and, for grouped products, the int32 group
        end offsets [E]."""
        E = kept_counts.numel()
        if self.experts_impl == "bmm":
            cap = max(ALIGN, int(math.ceil(int(kept_counts.max()) / ALIGN)) * ALIGN)  # host read
            start = torch.arange(E, device=kept_counts.device, dtype=torch.int64) * cap
            return start, E * cap, None, cap
        rows = assignments + E * ALIGN  # fixed size: every padded group fits
        padded = torch.clamp_min((kept_counts + ALIGN - 1) // ALIGN * ALIGN, ALIGN)
        slack = rows - padded.sum()
        padded = torch.cat([padded[:-1], padded[-1:] + slack])
        ends = torch.cumsum(padded, 0)
        return ends - padded, rows, ends.to(torch.int32), None

    def _experts(self, x: torch.Tensor, W1, W3, W2, offs, cap) -> torch.Tensor:
        """SwiGLU of every expert over its rows of x [rows, d]: (silu(x W1) * (x W3)) W2."""
        if self.experts_impl == "bmm":
            E = W1.shape[0]
            xb = x.reshape(E, cap, x.shape[1])
            h = F.silu(torch.bmm(xb, W1)) * torch.bmm(xb, W3)
            return torch.bmm(h, W2).reshape(E * cap, -1)
        if self.experts_impl == "grouped_mm":
            bf = torch.bfloat16
            xb = x.to(bf)
            h = F.silu(torch._grouped_mm(xb, W1.to(bf), offs=offs)) * torch._grouped_mm(xb, W3.to(bf), offs=offs)
            return torch._grouped_mm(h, W2.to(bf), offs=offs)
        # "loop": grouped_mm's semantics, one product per group (rows offs[e-1]:offs[e]).
        ends = offs.tolist()
        ys, begin = [], 0
        for e, end in enumerate(ends):
            v = x[begin:end]
            ys.append((F.silu(v @ W1[e]) * (v @ W3[e])) @ W2[e])
            begin = end
        return torch.cat(ys, 0)

    def moe(self, P, prefix: str, u: torch.Tensor, stats: dict) -> torch.Tensor:
        if self.experts_impl == "ref":
            return super().moe(P, prefix, u, stats)
        cfg = self.cfg
        S, d = u.shape
        E, k = cfg.n_experts, cfg.top_k
        A = S * k
        dev = u.device
        rlogits = u @ P[f"{prefix}.router"]                           # [S, E]
        probs = torch.softmax(rlogits, dim=-1)
        with torch.no_grad():  # the reference's top-k: stable sort, ties to the lower expert
            top_idx = torch.sort(probs, dim=-1, descending=True, stable=True)[1][:, :k]
        top_p = probs.gather(1, top_idx)
        w = top_p / top_p.sum(dim=-1, keepdim=True) if cfg.renormalize else top_p

        with torch.no_grad():
            flat_e = top_idx.reshape(-1)                              # assignment t*k + j
            ones = torch.ones(A, dtype=torch.int64, device=dev)
            counts = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, flat_e, ones)
            if cfg.capacity_factor > 0:  # each expert keeps its first C in (t, j) order
                C = math.ceil(cfg.capacity_factor * S * k / E)
                onehot = F.one_hot(flat_e, E)
                pos = (onehot.cumsum(0) * onehot).sum(-1) - 1
                key = torch.where(pos < C, flat_e, torch.full_like(flat_e, E))  # E: dropped
            else:
                key = flat_e
            kept = torch.zeros(E + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, ones)
            order = torch.argsort(key, stable=True)                  # grouped by expert
            sorted_key = key[order]
            rank = torch.arange(A, device=dev) - (torch.cumsum(kept, 0) - kept)[sorted_key]
            start, rows, offs, cap = self._layout(kept[:E], A)
            start = torch.cat([start, start.new_zeros(1)])
            dest = torch.empty_like(order)                            # buffer row per assignment
            dest[order] = torch.where(sorted_key < E, start[sorted_key] + rank,
                                      torch.full_like(rank, rows))    # dropped: row `rows`
            tok = torch.div(torch.arange(A, device=dev), k, rounding_mode="floor")
            src = torch.full((rows + 1,), S, dtype=torch.int64, device=dev)  # S: a zero row
            src[dest] = tok
            src = src[:rows]

        W1, W3, W2 = (P[f"{prefix}.{name}"] for name in ("w1", "w3", "w2"))
        x = torch.cat([u, u.new_zeros(1, d)]).index_select(0, src)  # [rows, d]
        y = self._experts(x, W1, W3, W2, offs, cap)                  # [rows, d]
        y = torch.cat([y, y.new_zeros(1, d)]).index_select(0, dest)  # [A, d]; dropped: zero
        out = torch.zeros_like(u).index_add(0, tok, y * w.reshape(-1)[:, None])

        f_i = counts.to(u.dtype) / (S * k)
        P_i = probs.mean(dim=0)
        stats["counts"].append(counts)
        stats["aux"].append(E * (f_i * P_i).sum())
        stats["z"].append((torch.logsumexp(rlogits, dim=-1) ** 2).mean())
        return out
