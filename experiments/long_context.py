"""Long-context training with ring attention, LWM-style: the context grows in stages while RoPE's
theta is raised, every stage's activations split along the sequence over 8 devices.

Command (sets up 8 simulated CPU devices itself; about 24 minutes on 2 CPU cores, measured
2026-11-25; not run in CI):

    python experiments/long_context.py --workdir workdirs/long_context
    python experiments/long_context.py --workdir /tmp/lc --memory-only    # the memory table only

LWM (Liu et al. 2024) grew a LLaMA's context 32K -> 128K -> ... -> 1M tokens, raising RoPE's theta
at each stage (1M -> 10M -> ... -> 50M) and initialising each stage from the previous one, with
ring attention spreading the sequence over devices. The same recipe, scaled to a CPU:

  stage    context   RoPE theta   batch x context   steps   peak lr   init
  ctx512       512       10,000      16 x 512         150    2e-3     fresh
  ctx2k       2048      100,000       4 x 2048         40    2e-3     ctx512
  ctx16k     16384    1,000,000       1 x 16384         8    4e-4     ctx2k

each run as `mmjax train experiments/llm_text.py --mesh seq=8 --set parallelism=context`: the
`context` preset shards every activation's length over the `seq` axis (8 ways) and switches the
model to ring attention (`mmjax.ops.attention(implementation="ring")`: each device keeps its
query block while K/V blocks travel round the ring, zigzag-ordered so causal work is balanced).
Data: Python's documentation text as ONE long document (`data.doc_min_chars=10**7`), so every
row is contiguous text and the long context is real context. Each stage reports its validation
loss / bits per byte at its own context length.

Memory: for each context (and 32K, 64K beyond the stages) the train step of the same model is
compiled twice -- on the 8-device `seq=8` mesh with ring attention, and on one device with full
(XLA) attention -- and XLA's memory analysis of the compiled programs gives the bytes one device
needs (arguments + outputs - aliased + temporaries). Nothing is allocated for the analysis, so
contexts that no device here could hold are measured too.

Writes results.json and long_context.md (tables) into the workdir; stage workdirs under runs/.
Measured results (docs/long_context.md): val loss 7.627 -> 5.088 (512), 5.104 -> 4.914 (2K),
4.950 -> 4.918 (16K); per-device memory at 16K 1.47 GiB with ring over seq=8 vs 105.4 GiB for
full attention on one device.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
LLM_TEXT = os.path.join(HERE, "llm_text.py")
DEVICES = 8
MESH = "seq=8"

# the last stage's batch is one 16K-token row: at the first stages' learning rate its few noisy
# steps raised the validation loss (4.95 -> 5.19 in a measured run), so it steps more gently
STAGES = (
    dict(name="ctx512", seq_len=512, theta=1e4, batch=16, steps=150, warmup=15, lr=2e-3),
    dict(name="ctx2k", seq_len=2048, theta=1e5, batch=4, steps=40, warmup=4, lr=2e-3),
    dict(name="ctx16k", seq_len=16384, theta=1e6, batch=1, steps=8, warmup=2, lr=4e-4),
)
MEMORY_CONTEXTS = (512, 2048, 16384, 32768, 65536)
MODEL = dict(dim=256, num_layers=4, num_heads=8, num_kv_heads=4, mlp_dim=688)


def stage_overrides(stage: dict, init_from: str | None) -> list[str]:
    items = [f"model.{k}={v}" for k, v in MODEL.items()] + [
        f"model.max_len={stage['seq_len']}", f"model.rope_theta={stage['theta']}",
        "model.dropout=0.0", "model.dtype='float32'",
        f"data.seq_len={stage['seq_len']}", f"data.batch_size={stage['batch']}",
        "data.doc_min_chars=10000000", "data.shuffle_window=16",
        f"optimizer.warmup_steps={stage['warmup']}", f"optimizer.learning_rate={stage['lr']}",
        "parallelism='context'", "eval_every=0", "checkpoint_every=0", "log_every=1",
        "sample.max_new_tokens=48", f"init_from={init_from!r}",
    ]
    return items


def run_stages(workdir: str) -> list[dict]:
    from mmjax.train import run

    results, previous = [], None
    for stage in STAGES:
        wd = os.path.join(workdir, "runs", stage["name"])
        done = os.path.join(wd, "stage_result.json")
        if os.path.isfile(done):
            with open(done) as f:
                r = json.load(f)
        else:
            print(f"== stage {stage['name']}: context {stage['seq_len']}, theta {stage['theta']:g}",
                  flush=True)
            if previous:  # the same tokenizer as the stage whose params it starts from
                os.makedirs(wd, exist_ok=True)
                shutil.copyfile(os.path.join(previous, "tokenizer.model"),
                                os.path.join(wd, "tokenizer.model"))
            m = run(LLM_TEXT, workdir=wd, steps=stage["steps"], mesh=MESH,
                    overrides=stage_overrides(stage, previous))
            r = {**stage, "val_loss": m["val_loss"], "val_bpb": m.get("val_bpb"),
                 "start_val_loss": m.get("start_val_loss"), "start_val_bpb": m.get("start_val_bpb"),
                 "train_loss": m["train_loss"], "wall_time_s": m["wall_time_s"],
                 "sample": m.get("sample")}
            with open(done, "w") as f:
                json.dump(r, f, indent=2)
        results.append(r)
        previous = wd
    return results


def measure_memory(contexts=MEMORY_CONTEXTS) -> list[dict]:
    """Per-device bytes of the compiled train step: ring on seq=8 vs full attention on 1 device."""
    import jax
    import numpy as np

    from mmjax.models.llama import Llama, LlamaConfig
    from mmjax.parallel import get_preset, make_mesh
    from mmjax.tasks.lm import lm_init_fn, lm_loss_fn
    from mmjax.train.experiment import OptimizerConfig
    from mmjax.train.optimizer import make_optimizer
    from mmjax.train.state import abstract_boxed_params, abstract_train_state, state_shardings
    from mmjax.train.step import batch_sharding, make_train_step

    preset = get_preset("context")
    rows = []
    for t in contexts:
        cfg = LlamaConfig(vocab_size=2048, max_len=t, tie_embeddings=True, **MODEL)
        row = {"context": t}
        for name, mesh_spec, impl in (("ring_seq8", MESH, "ring"), ("one_device", None, "xla")):
            init = lm_init_fn(Llama(cfg), t)
            model = Llama(cfg.replace(implementation=impl))
            tx, schedule = make_optimizer(OptimizerConfig(), 100, abstract_boxed_params(init))
            if mesh_spec:
                mesh = make_mesh(mesh_spec, devices=jax.devices()[:DEVICES])
                sh = state_shardings(init, tx, mesh, preset.rules, preset.opt_rules)
                state = abstract_train_state(init, tx, shardings=sh)
                bsh = batch_sharding(mesh, preset.rules)
                step = make_train_step(lm_loss_fn(model), tx, schedule, mesh=mesh, shardings=sh,
                                       rules=preset.rules)
            else:
                state, bsh = abstract_train_state(init, tx), None
                step = make_train_step(lm_loss_fn(model), tx, schedule)
            tok = jax.ShapeDtypeStruct((1, t), np.int32, sharding=bsh)
            batch = {"inputs": tok, "targets": tok, "segment_ids": tok, "positions": tok,
                     "loss_mask": jax.ShapeDtypeStruct((1, t), np.float32, sharding=bsh)}
            mem = step.lower(state, batch).compile().memory_analysis()
            total = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                     - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
            row[name] = {"per_device_bytes": total, "temp_bytes": mem.temp_size_in_bytes,
                         "argument_bytes": mem.argument_size_in_bytes}
            print(f"  context {t:>6}: {name:<10} {total / 2**30:8.3f} GiB per device", flush=True)
        row["one_device_over_ring"] = (row["one_device"]["per_device_bytes"]
                                       / row["ring_seq8"]["per_device_bytes"])
        rows.append(row)
    return rows


def write_report(workdir: str, stages: list[dict], memory: list[dict]) -> str:
    lines = []
    if stages:
        lines += ["| stage | context | RoPE theta | steps | val loss (start -> end) | val bpb (start -> end) | train loss | wall s |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in stages:
            lines.append(f"| {s['name']} | {s['seq_len']} | {s['theta']:g} | {s['steps']} | "
                         f"{s['start_val_loss']:.3f} -> {s['val_loss']:.3f} | "
                         f"{s['start_val_bpb']:.3f} -> {s['val_bpb']:.3f} | {s['train_loss']:.3f} | "
                         f"{s['wall_time_s']:.0f} |")
        lines.append("")
    lines += ["| context | ring, seq=8: GiB per device | full attention, 1 device: GiB | ratio |",
              "|---|---|---|---|"]
    for r in memory:
        a, b = r["ring_seq8"]["per_device_bytes"], r["one_device"]["per_device_bytes"]
        lines.append(f"| {r['context']:,} | {a / 2**30:.3f} | {b / 2**30:.3f} | "
                     f"{r['one_device_over_ring']:.1f}x |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "long_context.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="workdirs/long_context")
    p.add_argument("--memory-only", action="store_true")
    args = p.parse_args(argv)
    import jax

    if jax.device_count() < DEVICES:  # re-run with 8 simulated CPU devices
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={DEVICES}"]))
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])],
                               env=env)
    os.makedirs(args.workdir, exist_ok=True)
    stages = [] if args.memory_only else run_stages(args.workdir)
    memory = measure_memory()
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"stages": stages, "memory": memory, "mesh": MESH, "model": MODEL}, f, indent=2)
    print(write_report(args.workdir, stages, memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
