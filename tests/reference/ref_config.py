"""LoopMoE reference (PyTorch oracle): configuration and the flat parameter layout.

Written from docs/MODEL.md ("Parameters and their order in the flat buffer") and docs/CONFIG.md;
loopmoe_ref.py re-exports everything here, so callers import loopmoe_ref only.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Sequence, Tuple

IADALN_MODES = ("off", "iter", "token", "joint")

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
