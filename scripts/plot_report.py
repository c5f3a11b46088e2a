#!/usr/bin/python3
"""Plots of the LoopMoE experiment report.

Usage: /usr/bin/python3 scripts/plot_report.py REPORT_DATA_JSON PLOTS_DIR

`loopmoe report` gathers every finished run into report_data.json and calls this script; it
writes (each only when there is data for it):
  val_loss.png         training and validation loss curves, mean per variant, seeds faint
  routing_heatmap.png  tokens share per expert for each (layer, iteration), one panel per model
  logit_lens.png       validation loss decoding the residual stream after each iteration
  loop_sweep.png       loss vs inference loop count; adaptive halting loss vs avg iterations
  lr_sweep.png         final validation loss per candidate learning rate and family
Needs matplotlib and numpy (Debian: python3-matplotlib), nothing else.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


def colors(n):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def palette(data):
    """One colour per variant, the same in every plot; families take their first variant's."""
    names = [v["name"] for v in data["variants"]]
    out = dict(zip(names, colors(len(names))))
    for v in data["variants"]:
        out.setdefault(v["model"], out[v["name"]])
    return out


def mean_curve(curves):
    """Mean over seeds at the steps every seed has (seeds of one variant share a schedule)."""
    common = None
    for c in curves:
        steps = {s for s, _ in c}
        common = steps if common is None else common & steps
    if not common:
        return [], []
    steps = sorted(common)
    means = [np.mean([dict(c)[s] for c in curves]) for s in steps]
    return steps, means


def by_x(points):
    """{x: [values over seeds]} from per-run [[x, value], ...] lists."""
    out = {}
    for run in points:
        for x, v in run:
            out.setdefault(x, []).append(v)
    return out


def save(fig, plots_dir, name):
    fig.tight_layout()
    fig.savefig(os.path.join(plots_dir, name), dpi=120)
    plt.close(fig)
    print("wrote", name)


def plot_loss_curves(data, plots_dir):
    variants = [v for v in data["variants"] if any(r["val_curve"] for r in v["runs"])]
    if not variants:
        return
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    pal = palette(data)
    for v in variants:
        color = pal[v["name"]]
        for key, ax in (("train_curve", ax_train), ("val_curve", ax_val)):
            curves = [r[key] for r in v["runs"] if r[key]]
            for c in curves:
                ax.plot([s for s, _ in c], [x for _, x in c], color=color, alpha=0.25, lw=0.8)
            steps, means = mean_curve(curves)
            if steps:
                label = "%s (n=%d)" % (v["name"], len(curves))
                ax.plot(steps, means, color=color, lw=1.8, label=label,
                        marker="o" if key == "val_curve" else None, ms=3)
    ax_train.set_title("training loss")
    ax_val.set_title("validation loss")
    for ax in (ax_train, ax_val):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=8)
    save(fig, plots_dir, "val_loss.png")


def plot_heatmaps(data, plots_dir):
    maps = [m for m in data.get("heatmaps", []) if m["rows"]]
    if not maps:
        return
    heights = [max(2.0, 0.35 * len(m["rows"]) + 1.2) for m in maps]
    fig, axes = plt.subplots(len(maps), 1, figsize=(12, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for m, ax in zip(maps, axes[:, 0]):
        rows = sorted(m["rows"], key=lambda r: (r["layer"], r["iteration"]))
        counts = np.array([r["tokens_per_expert"] for r in rows], dtype=float)
        totals = counts.sum(axis=1, keepdims=True)
        share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        n_experts = share.shape[1]
        im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(["layer %d, r=%d" % (r["layer"], r["iteration"]) for r in rows],
                           fontsize=7)
        ax.set_xlabel("expert")
        step = max(1, n_experts // 20)
        ax.set_xticks(range(0, n_experts, step))
        ax.set_title("%s (%s): share of routed token slots; uniform = 1/%d = %.3f"
                     % (m["variant"], m["run"], n_experts, 1.0 / n_experts), fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    save(fig, plots_dir, "routing_heatmap.png")


def errorbar_series(ax, runs_points, label, color):
    per_x = by_x(runs_points)
    if not per_x:
        return False
    xs = sorted(per_x)
    means = [np.mean(per_x[x]) for x in xs]
    stds = [np.std(per_x[x], ddof=1) if len(per_x[x]) > 1 else 0.0 for x in xs]
    ax.errorbar(xs, means, yerr=stds, label=label, color=color, marker="o", ms=4, capsize=3)
    return True


def add_vanilla_lines(data, axes, pal):
    """A non-looped model is one number on these axes: its validation loss at its fixed depth."""
    for v in data["variants"]:
        if v["n_loops"] > 1:
            continue
        losses = [r["val_loss"] for r in v["runs"] if r["val_loss"] is not None]
        if losses:
            for ax in axes:
                ax.axhline(np.mean(losses), color=pal[v["name"]], ls="--", lw=1.2,
                           label="%s (val loss)" % v["name"])


def plot_logit_lens(data, plots_dir):
    variants = [v for v in data["variants"]
                if v["n_loops"] > 1 and any(r["logit_lens"] for r in v["runs"])]
    if not variants:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pal = palette(data)
    for v in variants:
        errorbar_series(ax, [r["logit_lens"] for r in v["runs"]], v["name"], pal[v["name"]])
    add_vanilla_lines(data, [ax], pal)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("iteration r (residual stream decoded after it)")
    ax.set_ylabel("validation loss")
    ax.set_title("loss per iteration (logit lens), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, plots_dir, "logit_lens.png")


def plot_loop_sweep(data, plots_dir):
    looped = [v for v in data["variants"] if v["n_loops"] > 1]
    has_sweep = [v for v in looped if any(len(r["loop_sweep"]) > 1 for r in v["runs"])]
    has_adaptive = [v for v in looped if any(r["adaptive"] for r in v["runs"])]
    if not has_sweep and not has_adaptive:
        return
    fig, (ax_loops, ax_adapt) = plt.subplots(1, 2, figsize=(12, 4.5))
    pal = palette(data)
    for v in has_sweep:
        errorbar_series(ax_loops, [r["loop_sweep"] for r in v["runs"]], v["name"],
                        pal[v["name"]])
        ax_loops.axvline(v["n_loops"], color="grey", ls=":", lw=0.8)
    for v in has_adaptive:
        pts = [(a[2], a[1]) for r in v["runs"] for a in r["adaptive"]]
        pts.sort()
        ax_adapt.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, ls="",
                      color=pal[v["name"]], label=v["name"])
    add_vanilla_lines(data, [ax_loops, ax_adapt], pal)
    ax_loops.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_loops.set_xlabel("loops at inference (dotted: trained R)")
    ax_loops.set_ylabel("validation loss")
    ax_loops.set_title("loss vs inference loop count")
    ax_adapt.set_xlabel("average iterations per token")
    ax_adapt.set_ylabel("validation loss")
    ax_adapt.set_title("adaptive halting (one point per threshold and seed)")
    for ax in (ax_loops, ax_adapt):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save(fig, plots_dir, "loop_sweep.png")


def plot_lr_sweep(data, plots_dir):
    sweep = data.get("sweep")
    if not sweep or not sweep.get("points"):
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = []
    for p in sweep["points"]:
        if p["family"] not in families:
            families.append(p["family"])
    pal = palette(data)
    fallback = dict(zip(families, colors(len(families))))
    for family in families:
        color = pal.get(family, fallback[family])
        pts = sorted((p["lr"], p["val_loss"]) for p in sweep["points"]
                     if p["family"] == family and p["val_loss"] is not None)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=family)
        chosen = sweep.get("chosen", {}).get(family)
        for lr, loss in pts:
            if lr == chosen:
                ax.plot([lr], [loss], marker="*", ms=14, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title("learning-rate sweep (%d steps, seed %d; star: chosen)"
                 % (sweep.get("steps", 0), sweep.get("seed", 0)))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save(fig, plots_dir, "lr_sweep.png")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        data = json.load(f)
    plots_dir = sys.argv[2]
    os.makedirs(plots_dir, exist_ok=True)
    for plot in (plot_loss_curves, plot_heatmaps, plot_logit_lens, plot_loop_sweep,
                 plot_lr_sweep):
        plot(data, plots_dir)


if __name__ == "__main__":
    main()
