"""Scaling laws on Python's documentation text: a grid of small LLaMA runs, power-law fits, a plot.

Command (about 15 minutes on 2 CPU cores; not run in CI):

    python experiments/scaling_laws.py --workdir workdirs/scaling_laws
    python experiments/scaling_laws.py --workdir /tmp/sl --quick     # a tiny grid (2 sizes), for trying it out

Every run is a complete run of `experiments/llm_text.py`'s setup (same corpus split, same
2048-piece tokenizer shared by all runs, warmup + cosine schedule spanning the run, no
dropout) with the model size and the number of training tokens varied: sizes = non-embedding
parameters N (Kaplan et al.'s convention) of 4 LLaMA shapes, tokens D = steps x 16 x 128.
The validation loss L (nats/token, whole validation split) feeds three fits of
`L(x) = (c / x) ** alpha` (`mmjax.eval.scaling.fit_power_law`, least squares in log space):

- L(D): the largest model after 100, 200, 400 steps (the end-of-run loss of each).
- L(C): the compute frontier of the 4 x 3 grid (C = 6 N D; a run is on it when no run with
  less compute reached a lower loss).
- L(N): each size trained for 1600 steps (~25 epochs of the 128k-token training split) with
  validation every 100 steps; its best validation loss (early stopping) is L(N). At a fixed
  small D the sizes are not comparable -- the larger ones are further from convergence --
  and with a 128k-token split long runs overfit, so the early-stopped loss is each size's
  best attainable loss on this data, the quantity Kaplan et al.'s L(N) describes.

Writes `results.json` (every run and every fit), `scaling_laws.md` (a table) and
`scaling_laws.png` (loss vs N, D and C with the fitted lines, and the long runs' validation
curves) into the workdir; each run's own
workdir (checkpoints, metrics, TensorBoard) is under `runs/`. Re-running skips finished runs.

Expected result (measured 2026-11-25, quiet, 14 min 34 s): L(D) alpha 0.185 (R² 0.997), L(C)
alpha 0.138 (R² 0.93), early-stopped L(N) alpha 0.013 (R² 0.98); table, plot and reading in
docs/scaling_laws.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LLM_TEXT = os.path.join(HERE, "llm_text.py")

# name -> (dim, layers, heads, kv_heads, mlp_dim)
SIZES = {
    "d64_l2": (64, 2, 4, 2, 176),
    "d128_l2": (128, 2, 4, 2, 344),
    "d192_l3": (192, 3, 6, 3, 512),
    "d256_l4": (256, 4, 8, 4, 688),
}
STEPS = (100, 200, 400)
# L(N): every size trained for LONG_STEPS (~25 epochs of the training split) with validation
# every EVAL_EVERY steps; the best validation loss of the run is its early-stopped loss
LONG_STEPS, EVAL_EVERY = 1600, 100
BATCH, SEQ = 16, 128
QUICK_SIZES, QUICK_STEPS, QUICK_LONG = ("d64_l2", "d128_l2"), (50, 100), (200, 50)


def non_embedding_params(dim: int, layers: int, heads: int, kv: int, mlp: int) -> int:
    """Attention (q, k, v, out) + SwiGLU MLP + the two norms per layer, plus the final norm."""
    head = dim // heads
    attn = dim * heads * head + 2 * dim * kv * head + heads * head * dim
    return layers * (attn + 3 * dim * mlp + 2 * dim) + dim


def overrides(size: str, steps: int, eval_every: int = 0) -> list[str]:
    dim, layers, heads, kv, mlp = SIZES[size]
    return [f"model.dim={dim}", f"model.num_layers={layers}", f"model.num_heads={heads}",
            f"model.num_kv_heads={kv}", f"model.mlp_dim={mlp}", "model.dropout=0.0",
            f"data.batch_size={BATCH}", f"data.seq_len={SEQ}", f"optimizer.warmup_steps={steps // 10}",
            f"eval_every={eval_every}", "checkpoint_every=0", "sample.max_new_tokens=32",
            "log_every=25"]


def grid(quick: bool) -> list[tuple[str, int, int]]:
    """(size, steps, eval_every) of every run: the size x tokens grid, then one long run per
    size with validation along the way (for the early-stopped L(N))."""
    sizes, steps = (QUICK_SIZES, QUICK_STEPS) if quick else (tuple(SIZES), STEPS)
    long_steps, every = QUICK_LONG if quick else (LONG_STEPS, EVAL_EVERY)
    return [(s, n, 0) for s in sizes for n in steps] + [(s, long_steps, every) for s in sizes]


def validation_curve(workdir: str) -> list[tuple[int, float, float]]:
    """(step, val_loss, val_bpb) of every evaluation in a run's metrics.jsonl."""
    out = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if "val_loss" in m and m.get("step", 0) > 0:
                out.append((m["step"], m["val_loss"], m.get("val_bpb")))
    return out


def run_grid(workdir: str, quick: bool) -> list[dict]:
    from mmjax.train import run

    runs_dir = os.path.join(workdir, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    shared_tok = os.path.join(workdir, "tokenizer.model")
    results = []
    points = grid(quick)
    for i, (size, steps, every) in enumerate(points):
        name = f"{size}_s{steps}" + ("_es" if every else "")
        wd = os.path.join(runs_dir, name)
        done = os.path.join(wd, "result.json")
        if os.path.isfile(done):
            with open(done) as f:
                results.append(json.load(f))
            continue
        os.makedirs(wd, exist_ok=True)
        if os.path.isfile(shared_tok):
            shutil.copyfile(shared_tok, os.path.join(wd, "tokenizer.model"))
        print(f"[{i + 1}/{len(points)}] {name}", flush=True)
        t0 = time.perf_counter()
        m = run(LLM_TEXT, workdir=wd, steps=steps, overrides=overrides(size, steps, every))
        if not os.path.isfile(shared_tok):
            shutil.copyfile(os.path.join(wd, "tokenizer.model"), shared_tok)
        n = non_embedding_params(*SIZES[size])
        d = steps * BATCH * SEQ
        r = {"name": name, "size": size, "steps": steps, "N": n, "D": d, "C": 6 * n * d,
             "val_loss": m["val_loss"], "val_bpb": m.get("val_bpb"), "train_loss": m["train_loss"],
             "wall_time_s": time.perf_counter() - t0, "early_stopping": bool(every)}
        if every:
            curve = validation_curve(wd)
            best = min(curve, key=lambda c: c[1])
            r.update(best_step=best[0], best_val_loss=best[1], best_val_bpb=best[2],
                     curve=[list(c) for c in curve])
        with open(done, "w") as f:
            json.dump(r, f, indent=2)
        results.append(r)
    return results


def fit_all(results: list[dict]) -> dict:
    """L(N) on the early-stopped long runs; L(D) at the largest N and L(C) on the compute
    frontier of the grid runs."""
    from mmjax.eval.scaling import fit_power_law

    grid_runs = [r for r in results if not r.get("early_stopping")]
    max_n = max(r["N"] for r in grid_runs)
    by_n = sorted((r for r in results if r.get("early_stopping")), key=lambda r: r["N"])
    by_d = sorted((r for r in grid_runs if r["N"] == max_n), key=lambda r: r["D"])
    frontier, best = [], float("inf")
    for r in sorted(grid_runs, key=lambda r: r["C"]):
        if r["val_loss"] < best:
            best = r["val_loss"]
            frontier.append(r)
    fits = {}
    for key, rows, loss in (("N", by_n, "best_val_loss"), ("D", by_d, "val_loss"),
                            ("C", frontier, "val_loss")):
        if len({r[key] for r in rows}) >= 2:
            f = fit_power_law([r[key] for r in rows], [r[loss] for r in rows])
            fits[key] = {"c": f.c, "alpha": f.alpha, "r2": f.r2, "n": f.n, "formula": f.describe(key),
                         "runs": [r["name"] for r in rows], "loss": loss}
    return fits


def plot(results: list[dict], fits: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid_runs = [r for r in results if not r.get("early_stopping")]
    long_runs = sorted((r for r in results if r.get("early_stopping")), key=lambda r: r["N"])
    sizes = sorted({r["size"] for r in results}, key=lambda s: SIZES[s][0])
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    labels = {"N": "non-embedding parameters N", "D": "training tokens D", "C": "compute C = 6ND (FLOPs)"}
    for ax, key in zip(axes, ("N", "D", "C")):
        if key == "N":
            ax.plot([r["N"] for r in long_runs], [r["best_val_loss"] for r in long_runs], "o",
                    label=f"best of each {long_runs[0]['steps'] if long_runs else 0}-step run")
        else:
            for size in sizes:
                rows = sorted((r for r in grid_runs if r["size"] == size), key=lambda r: r[key])
                ax.plot([r[key] for r in rows], [r["val_loss"] for r in rows], "o-", alpha=0.6, label=size)
        if key in fits:
            f = fits[key]
            xs = np.array([r[key] for r in results if r["name"] in f["runs"]])
            grid_x = np.logspace(np.log10(xs.min()), np.log10(xs.max()), 50)
            ax.plot(grid_x, (f["c"] / grid_x) ** f["alpha"], "k--", lw=2,
                    label=f"fit: alpha={f['alpha']:.3f}, R²={f['r2']:.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(labels[key])
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[3]
    for r in long_runs:
        steps, losses = [c[0] for c in r["curve"]], [c[1] for c in r["curve"]]
        ax.plot(steps, losses, "-", label=f"{r['size']} (best {r['best_val_loss']:.3f} @ {r['best_step']})")
    ax.set_xlabel("step (16 x 128 tokens)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("long runs: where early stopping lands", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("mmjax LLaMA on Python docs: L(x) = (c/x)^alpha")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(results: list[dict], fits: dict, path: str) -> None:
    lines = ["| run | N (non-emb.) | D (tokens) | C (FLOPs) | val loss (end) | val bpb (end) | best val loss (step) | train loss | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r.get("early_stopping", False), r["N"], r["D"])):
        best = (f"{r['best_val_loss']:.4f} ({r['best_step']})" if r.get("early_stopping") else "")
        lines.append(f"| {r['name']} | {r['N']:,} | {r['D']:,} | {r['C']:.2e} | {r['val_loss']:.4f} | "
                     f"{r['val_bpb']:.4f} | {best} | {r['train_loss']:.4f} | {r['wall_time_s']:.0f} |")
    lines.append("")
    for f in fits.values():
        lines.append(f"- {f['formula']}  [{f['loss']} of {', '.join(f['runs'])}]")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="workdirs/scaling_laws")
    p.add_argument("--quick", action="store_true", help="2 x 2 grid of short runs")
    args = p.parse_args(argv)
    results = run_grid(args.workdir, args.quick)
    fits = fit_all(results)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"runs": results, "fits": fits}, f, indent=2)
    write_table(results, fits, os.path.join(args.workdir, "scaling_laws.md"))
    plot(results, fits, os.path.join(args.workdir, "scaling_laws.png"))
    for f in fits.values():
        print(f["formula"])
    print(f"wrote {args.workdir}/results.json, scaling_laws.md, scaling_laws.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
