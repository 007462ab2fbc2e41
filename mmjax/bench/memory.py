"""`mmjax bench memory`: per-device memory of one training step under each parallelism preset.

For a ~110M-parameter LLaMA (vocab 32000, dim 768, 12 layers, 16 heads, SwiGLU 2048, tied
embeddings, float32 params and AdamW moments) on 8 devices, each preset's real train step
(`mmjax.train.step.make_train_step`, AdamW + clipping, batch 16 x 512) is lowered and compiled
on abstract shapes only (`jax.eval_shape` / `ShapeDtypeStruct`s with shardings; nothing is
materialised), and reported per device:

  params_bytes / opt_state_bytes  the shard of every param / optimizer-state leaf one device
                                  holds (from each leaf's sharding; the largest shard per leaf)
  temp_bytes                      XLA's temporaries of the compiled step (`memory_analysis()`:
                                  activations kept for the backward pass, gradients, collectives'
                                  buffers)
  argument/output/alias_bytes     the compiled step's inputs, outputs and the donated state
                                  buffers reused for the outputs
  total_bytes                     argument + output - alias + temp (what the step needs at once)

and as fractions of pure data parallelism (`vs_data`, preset "data" on the same 8 devices):
ZeRO-1 divides the optimizer state by the data axis (8), FSDP params and optimizer state by the
fsdp axis (8) -- up to the small replicated leaves (norm scales, Adam's step counter). The
`moe` cases compare the `expert` preset (experts split over expert=8, tokens moved by
all-to-all) with data parallelism on an MoE variant (8 experts of SwiGLU 512, top-2).

`ratio` (higher is better) = per-device state bytes (params + optimizer) under data parallelism
/ under the preset, for the worst of the sharded presets (the least saving); `cases` lists
each preset. Runs itself in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` when fewer than 8 devices are visible.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any, Sequence

DEFAULT_MODEL = dict(vocab_size=32000, dim=768, num_layers=12, num_heads=16, num_kv_heads=16,
                     mlp_dim=2048, max_len=512, tie_embeddings=True)
MOE_OVERRIDES = dict(mlp_dim=512, num_experts=8, experts_per_token=2)
DEFAULT_PRESETS = ("data", "zero1", "fsdp", "fsdp_tp", "tp_sp", "flamingo")
MOE_PRESETS = ("data", "expert")


def run(
    presets: Sequence[str] = DEFAULT_PRESETS, moe_presets: Sequence[str] = MOE_PRESETS,
    model: dict[str, Any] | None = None, moe: dict[str, Any] | None = None,
    batch: int = 16, seq_len: int = 512, devices: int = 8, meshes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Memory figures per preset (see the module docstring). `model` / `moe` override the dense
    config / the MoE overrides; `moe_presets=()` skips the MoE cases; `meshes` maps a preset to
    its mesh over `devices` (default: the preset's 8-device `example_mesh`), e.g.
    {"fsdp": "fsdp=4"} on a 4-device machine."""
    args = dict(presets=list(presets), moe_presets=list(moe_presets), model=model, moe=moe,
                batch=batch, seq_len=seq_len, devices=devices, meshes=dict(meshes or {}))
    import jax

    if jax.device_count() >= devices:
        return _run(**args)
    return _in_subprocess(args)


def _in_subprocess(args: dict[str, Any]) -> dict[str, Any]:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", MMJAX_MEMORY_ARGS=json.dumps(args),
               XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={args['devices']}"]))
    proc = subprocess.run([sys.executable, "-m", "mmjax.bench.memory"], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory benchmark subprocess failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["subprocess"] = f"re-executed with --xla_force_host_platform_device_count={args['devices']}"
    return result


def _run(presets, moe_presets, model, moe, batch, seq_len, devices, meshes=None) -> dict[str, Any]:
    import jax

    from mmjax.models.llama import LlamaConfig

    dense = LlamaConfig(**{**DEFAULT_MODEL, **(model or {})})
    moe_cfg = dense.replace(**{**MOE_OVERRIDES, **(moe or {})})
    devs = jax.devices()[:devices]
    meshes = meshes or {}
    cases = [dict(model="dense", **_measure(dense, p, batch, seq_len, devs, meshes.get(p)))
             for p in presets]
    cases += [dict(model="moe", **_measure(moe_cfg, p, batch, seq_len, devs, meshes.get(p)))
              for p in moe_presets]
    for c in cases:
        ref = next((r for r in cases if r["model"] == c["model"] and r["preset"] == "data"), None)
        if ref is not None:
            c["vs_data"] = {k: c[f"{k}_bytes"] / ref[f"{k}_bytes"]
                            for k in ("params", "opt_state", "state", "temp", "total")}
            c["state_saving"] = ref["state_bytes"] / c["state_bytes"]
    sharded = [c for c in cases if c["preset"] != "data" and "state_saving" in c]
    worst = min(sharded, key=lambda c: c["state_saving"]) if sharded else None
    return {
        "name": "memory",
        "reference": "pure data parallelism (preset 'data') on the same devices",
        "ratio": worst["state_saving"] if worst else None,
        "ratio_case": f"{worst['model']}/{worst['preset']}" if worst else None,
        "cases": cases,
        "model": {**dense.to_dict(), "num_params": dense.num_params()},
        "moe_model": {"num_params": moe_cfg.num_params(), **{k: getattr(moe_cfg, k) for k in
                      ("num_experts", "experts_per_token", "mlp_dim", "moe_dispatch")}},
        "batch": batch, "seq_len": seq_len, "devices": len(devs),
        "optimizer": "AdamW (float32 moments) + global-norm clipping",
    }


def _measure(cfg, preset_name: str, batch: int, seq_len: int, devices,
             mesh_spec: str | None = None) -> dict[str, Any]:
    """Per-device bytes of one preset's compiled train step (abstract shapes only)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from mmjax.models.llama import Llama
    from mmjax.parallel import get_preset, make_mesh
    from mmjax.tasks.lm import lm_init_fn, lm_loss_fn
    from mmjax.train.experiment import OptimizerConfig
    from mmjax.train.optimizer import make_optimizer
    from mmjax.train.state import abstract_boxed_params, abstract_train_state, state_shardings
    from mmjax.train.step import batch_sharding, make_train_step

    preset = get_preset(preset_name)
    cfg = preset.configure_model(cfg)
    mesh_spec = mesh_spec or preset.example_mesh
    mesh = make_mesh(mesh_spec, devices=devices)
    model = Llama(cfg)
    init = lm_init_fn(model, seq_len)
    tx, schedule = make_optimizer(OptimizerConfig(), 1000, abstract_boxed_params(init))
    sh = state_shardings(init, tx, mesh, preset.rules, preset.opt_rules)
    state = abstract_train_state(init, tx, shardings=sh)
    bsh = batch_sharding(mesh, preset.rules)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), np.int32, sharding=bsh)
    abstract_batch = {"inputs": tokens, "targets": tokens, "segment_ids": tokens,
                      "positions": tokens,
                      "loss_mask": jax.ShapeDtypeStruct((batch, seq_len), np.float32, sharding=bsh)}
    step = make_train_step(lm_loss_fn(model), tx, schedule, mesh=mesh, shardings=sh,
                           rules=preset.rules)
    compiled = step.lower(state, abstract_batch).compile()
    mem = compiled.memory_analysis()

    def shard_bytes(tree) -> int:
        total = 0
        for leaf in jax.tree_util.tree_leaves(tree):
            s = leaf.sharding
            shape = s.shard_shape(leaf.shape) if isinstance(s, NamedSharding) else leaf.shape
            total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
        return total

    params_b, opt_b = shard_bytes(state.params), shard_bytes(state.opt_state)
    args_b, out_b = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias_b, temp_b = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    return {
        "preset": preset.name, "mesh": mesh_spec,
        "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
        "params_bytes": params_b, "opt_state_bytes": opt_b, "state_bytes": params_b + opt_b,
        "temp_bytes": temp_b, "argument_bytes": args_b, "output_bytes": out_b,
        "alias_bytes": alias_b, "generated_code_bytes": mem.generated_code_size_in_bytes,
        "total_bytes": args_b + out_b - alias_b + temp_b,
    }


if __name__ == "__main__":  # the 8-device subprocess of `run`
    print(json.dumps(_run(**json.loads(os.environ["MMJAX_MEMORY_ARGS"]))), flush=True)
