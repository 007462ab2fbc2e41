"""Scaling laws on Python's documentation text: a grid of small LLaMA runs, power-law fits, a plot.

Command (about 20 minutes on 2 CPU cores; not run in CI):

    python experiments/scaling_laws.py --workdir workdirs/scaling_laws
    python experiments/scaling_laws.py --workdir /tmp/sl --quick     # 2 x 2 grid, ~3 minutes

Every grid point is a complete run of `experiments/llm_text.py`'s setup (same corpus split,
same 2048-piece tokenizer shared by all runs, warmup + cosine schedule spanning the run, no
dropout) with the model size and the number of training tokens varied:
sizes = non-embedding parameters N (Kaplan et al.'s convention) of 4 LLaMA shapes, tokens D =
steps x 16 x 128. Each run's validation loss L (nats/token, whole validation split) feeds three
fits of `L(x) = (c / x) ** alpha` (`mmjax.eval.scaling.fit_power_law`, least squares in log
space): L(N) at the largest D, L(D) at the largest N, and L(C) on the compute frontier
(C = 6 N D; for each run, the best loss reached with at most its compute).

Writes `results.json` (every run and every fit), `scaling_laws.md` (a table) and
`scaling_laws.png` (loss vs N, D and C with the fitted lines) into the workdir; each run's own
workdir (checkpoints, metrics, TensorBoard) is under `runs/`. Re-running skips finished runs.

Expected result: see docs/scaling_laws.md (measured numbers and the plot).
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
BATCH, SEQ = 16, 128
QUICK_SIZES, QUICK_STEPS = ("d64_l2", "d128_l2"), (50, 100)


def non_embedding_params(dim: int, layers: int, heads: int, kv: int, mlp: int) -> int:
    """Attention (q, k, v, out) + SwiGLU MLP + the two norms per layer, plus the final norm."""
    head = dim // heads
    attn = dim * heads * head + 2 * dim * kv * head + heads * head * dim
    return layers * (attn + 3 * dim * mlp + 2 * dim) + dim


def overrides(size: str, steps: int) -> list[str]:
    dim, layers, heads, kv, mlp = SIZES[size]
    return [f"model.dim={dim}", f"model.num_layers={layers}", f"model.num_heads={heads}",
            f"model.num_kv_heads={kv}", f"model.mlp_dim={mlp}", "model.dropout=0.0",
            f"data.batch_size={BATCH}", f"data.seq_len={SEQ}", f"optimizer.warmup_steps={steps // 10}",
            "eval_every=0", "checkpoint_every=0", "sample.max_new_tokens=32", "log_every=25"]


def grid(quick: bool) -> list[tuple[str, int]]:
    sizes, steps = (QUICK_SIZES, QUICK_STEPS) if quick else (tuple(SIZES), STEPS)
    return [(s, n) for s in sizes for n in steps]


def run_grid(workdir: str, quick: bool) -> list[dict]:
    from mmjax.train import run

    runs_dir = os.path.join(workdir, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    shared_tok = os.path.join(workdir, "tokenizer.model")
    results = []
    points = grid(quick)
    for i, (size, steps) in enumerate(points):
        name = f"{size}_s{steps}"
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
        m = run(LLM_TEXT, workdir=wd, steps=steps, overrides=overrides(size, steps))
        if not os.path.isfile(shared_tok):
            shutil.copyfile(os.path.join(wd, "tokenizer.model"), shared_tok)
        n = non_embedding_params(*SIZES[size])
        d = steps * BATCH * SEQ
        r = {"name": name, "size": size, "steps": steps, "N": n, "D": d, "C": 6 * n * d,
             "val_loss": m["val_loss"], "val_bpb": m.get("val_bpb"), "train_loss": m["train_loss"],
             "wall_time_s": time.perf_counter() - t0}
        with open(done, "w") as f:
            json.dump(r, f, indent=2)
        results.append(r)
    return results


def fit_all(results: list[dict]) -> dict:
    from mmjax.eval.scaling import fit_power_law

    max_d = max(r["D"] for r in results)
    max_n = max(r["N"] for r in results)
    by_n = sorted((r for r in results if r["D"] == max_d), key=lambda r: r["N"])
    by_d = sorted((r for r in results if r["N"] == max_n), key=lambda r: r["D"])
    frontier, best = [], float("inf")
    for r in sorted(results, key=lambda r: r["C"]):
        if r["val_loss"] < best:
            best = r["val_loss"]
            frontier.append(r)
    fits = {}
    for key, rows in (("N", by_n), ("D", by_d), ("C", frontier)):
        if len({r[key] for r in rows}) >= 2:
            f = fit_power_law([r[key] for r in rows], [r["val_loss"] for r in rows])
            fits[key] = {"c": f.c, "alpha": f.alpha, "r2": f.r2, "n": f.n, "formula": f.describe(key),
                         "runs": [r["name"] for r in rows]}
    return fits


def plot(results: list[dict], fits: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = {"N": "non-embedding parameters N", "D": "training tokens D", "C": "compute C = 6ND (FLOPs)"}
    for ax, key in zip(axes, ("N", "D", "C")):
        for size in sorted({r["size"] for r in results}, key=lambda s: SIZES[s][0]):
            rows = sorted((r for r in results if r["size"] == size), key=lambda r: r[key])
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
    fig.suptitle("mmjax LLaMA on Python docs: L(x) = (c/x)^alpha")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(results: list[dict], fits: dict, path: str) -> None:
    lines = ["| run | N (non-emb.) | D (tokens) | C (FLOPs) | val loss | val bpb | train loss | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["N"], r["D"])):
        lines.append(f"| {r['name']} | {r['N']:,} | {r['D']:,} | {r['C']:.2e} | {r['val_loss']:.4f} | "
                     f"{r['val_bpb']:.4f} | {r['train_loss']:.4f} | {r['wall_time_s']:.0f} |")
    lines.append("")
    for key, f in fits.items():
        lines.append(f"- {f['formula']}")
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
