#!/usr/bin/env python3
"""The one table of scripts/gpu_check.sh, from the records it collected.

    python3 bench/gpu_table.py RAW.jsonl [--dry-run]

RAW.jsonl holds one record per line, written by gpu_check.sh:
  {"case": C, "source": "ours"|"peer"|"plan"|"tests", "variant": V, "status": "ok"|"failed"|
   "timeout"|"skipped", "rc": N, "seconds": S, "detail": "..."}          (one per command run)
  {"case": C, "source": ..., "variant": V, "data": {...}}                  (each JSON line it printed)
Prints Markdown: a header (GPU, date, bf16 GEMM rate, Cuda* tests), the table, and notes (every
failure, timeout and skip with its reason; variant losses that disagree). Only numbers that a
record holds are printed; a missing one is "-", with the reason in the notes.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

GiB = 1024.0 ** 3
VARIANTS = ("eager", "grouped", "compile")
# Peer variants' step-0 losses must agree this closely (bf16 autocast, same init and tokens).
LOSS_AGREEMENT = 0.02
PROFILE_ROWS = 12  # per profiled case, the ops with the most time


def fmt_int(x):
    return "-" if x is None else f"{x:,.0f}"


def fmt_pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def fmt_gib(x):
    return "-" if x is None else f"{x / GiB:.2f}"


def load(path):
    records = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                records.append({"case": "?", "source": "?", "status": "failed",
                                "detail": f"{path}:{n}: unreadable record ({e})"})
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    records = load(args.raw)

    cases = []            # in first-seen order
    ours = {}             # case -> bench "case" data
    plan = {}             # case -> bench "plan" data
    peer = defaultdict(dict)   # case -> variant -> peer data
    profiles = {}         # case -> bench "profile" data (--profile)
    status = {}           # (case, source, variant) -> status record
    device = gemm = None
    gemm_rates = []       # every bench process measures its own
    tests = None
    meta = {}
    for r in records:
        case, source, variant = r.get("case"), r.get("source"), r.get("variant", "")
        if source == "meta":
            meta.update(r.get("data") or {})
            continue
        if source == "tests":
            tests = r
            continue
        if case and case not in cases and source in ("ours", "peer", "plan"):
            cases.append(case)
        if "data" in r:
            d = r["data"]
            if not isinstance(d, dict):
                continue
            kind = d.get("kind")
            if source == "ours" and kind == "device":
                device = d
            elif source == "ours" and kind == "gemm":
                gemm = gemm or d
                gemm_rates.append(d.get("mean_tflops"))
            elif source == "ours" and kind == "case":
                ours[case] = d
            elif source == "ours" and kind == "profile":
                profiles[case] = d
            elif source == "ours" and kind in ("sgemm",):
                gemm = gemm or d
            elif source == "plan" and kind == "plan":
                plan[case] = d
            elif source == "peer":
                peer[case][variant] = d
        else:
            status[(case, source, variant)] = r

    out = []
    title = "GPU check" + (" — DRY RUN on the CPU (no GPU used: these are CPU numbers)" if args.dry_run else "")
    out.append(f"## {title}")
    out.append("")
    gpu = device.get("name") if device else meta.get("gpu") or "-"
    out.append(f"- date: {meta.get('date', '-')}; commit: {meta.get('commit', '-')}; host: {meta.get('host', '-')}")
    out.append(f"- GPU: {gpu}" + (f" ({device['sms']} SMs, {device['memory_bytes'] / GiB:.1f} GiB, "
                                   f"compute capability {device['compute_capability']}, driver {device['driver']}, "
                                   f"runtime {device['runtime']})" if device else ""))
    if gemm and gemm.get("kind") == "gemm":
        rates = [r for r in gemm_rates if r]
        spread = (f"; {min(rates):.1f}–{max(rates):.1f} over the {len(rates)} bench processes, each case's "
                  f"MFU ours against its own process's rate, MFU peer against the first") if len(rates) > 1 else ""
        out.append(f"- bf16 GEMM {gemm['n']}^3 (cublasGemmEx, fp32 accumulation): {gemm['mean_tflops']:.1f} TFLOP/s "
                   f"mean of {gemm['reps']} (best {gemm['best_tflops']:.1f}) in the first bench process{spread}: "
                   f"the MFU denominator")
    elif gemm and gemm.get("kind") == "sgemm":
        out.append(f"- MFU denominator: CPU sgemm 2048^3 ({gemm.get('kernel')}), measured by the CPU bench")
    else:
        out.append("- bf16 GEMM rate: not measured (see notes); MFU columns are empty")
    if tests:
        out.append(f"- Cuda* tests: {tests.get('detail', '-')} ({tests.get('status')}, {tests.get('seconds', '-')} s)")
    out.append("")
    header = ["case", "ours tok/s", "ours ms/step", "peer eager", "peer grouped", "peer compile",
              "ours ÷ eager", "ours ÷ best peer", "MFU ours", "MFU best peer", "peak GiB ours", "peak GiB peer best"]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    notes = []
    denominator = gemm.get("mean_tflops") if gemm and gemm.get("kind") == "gemm" else None
    for case in cases:
        o = ours.get(case)
        flops = (o or {}).get("flops_per_token") or (plan.get(case) or {}).get("flops_per_token_train")
        tok = o.get("tokens_per_s") if o else None
        pv = {v: peer[case].get(v) for v in VARIANTS}
        ptok = {v: (d.get("tokens_per_s") if d else None) for v, d in pv.items()}
        best_v = max((v for v in VARIANTS if ptok[v]), key=lambda v: ptok[v], default=None)
        best = ptok[best_v] if best_v else None
        peer_mfu = best * flops / (denominator * 1e12) if best and flops and denominator else None
        row = [case, fmt_int(tok), "-" if not o else f"{o['step_ms']:.1f}",
               *(fmt_int(ptok[v]) for v in VARIANTS),
               fmt_ratio(tok / ptok["eager"] if tok and ptok["eager"] else None),
               fmt_ratio(tok / best if tok and best else None) + (f" ({best_v})" if tok and best else ""),
               fmt_pct(o.get("mfu")) if o else "-", fmt_pct(peer_mfu),
               fmt_gib(o.get("peak_bytes")) if o else "-",
               fmt_gib(pv[best_v].get("peak_mem_bytes")) if best_v else "-"]
        out.append("| " + " | ".join(row) + " |")
        if o and not o.get("finite", True):
            notes.append(f"{case}: ours: the loss was NOT finite")
        first = {v: d.get("first_loss") for v, d in pv.items() if d and d.get("first_loss") is not None}
        if len(first) > 1:
            lo, hi = min(first.values()), max(first.values())
            if hi - lo > LOSS_AGREEMENT * abs(lo):
                notes.append(f"{case}: peer step-0 losses disagree beyond {LOSS_AGREEMENT:.0%}: {first}")
        for v, d in pv.items():
            if d and d.get("experts") and v != "eager":
                notes.append(f"{case}: peer {v}: experts {d['experts']}, attention {d.get('attention')}, "
                             f"{d.get('optimizer')}, warm-up {d.get('warmup_s')} s, {d.get('steps')} timed steps")
    for (case, source, variant), r in status.items():
        if r.get("status") != "ok":
            what = f"{source}" + (f" {variant}" if variant else "")
            notes.append(f"{case}: {what}: {r.get('status')} (exit {r.get('rc', '-')}, {r.get('seconds', '-')} s)"
                         + (f": {r['detail']}" if r.get("detail") else ""))
    out.append("")
    precisions = sorted({str(d.get("precision", "fp32")) for d in ours.values()}) or ["fp32"]
    out.append(f"ours: loopmoe_bench --device cuda ({'/'.join(precisions)} products, fp32 accumulation, "
               "weights and optimizer; tokens/s over the timed steps; peak = the engine's "
               "device-Buffer high-water mark, one case per process). peer: bench/torch_peer.py --device cuda, bf16 "
               "autocast (eager = per-expert loop; grouped = grouped expert GEMMs + SDPA + fused AdamW; compile = "
               "torch.compile of grouped), peak = torch.cuda.max_memory_allocated. MFU = tokens/s x analytic "
               "training FLOPs per token (model/budget.h) / the bf16 GEMM rate above.")
    for case, d in profiles.items():
        ops = d.get("ops") or []
        out.append("")
        where = str(d.get("device", "-"))
        sync = " with a device synchronisation after each op" if where.startswith("cuda") else ""
        out.append(f"Op profile of ours, {case}: {d.get('steps')} step(s) on {where}{sync}, "
                   f"{d.get('step_ms', 0):.1f} ms per profiled step; the ops with the most time:")
        out.append("")
        out.append("| op | calls/step | ms/step | share |")
        out.append("|---|---:|---:|---:|")
        for op in ops[:PROFILE_ROWS]:
            out.append(f"| {op.get('op')} | {op.get('calls_per_step', 0):.1f} | {op.get('ms_per_step', 0):.2f} | "
                       f"{fmt_pct(op.get('share'))} |")
    if notes:
        out.append("")
        out.append("Notes:")
        out.extend(f"- {n}" for n in notes)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
