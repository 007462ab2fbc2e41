"""`mmjax bench clip`: images/s of one CLIP training step, mmjax vs transformers + torch AdamW.

Both sides train the same CLIP (by default image 64 px / patch 8 -> 65 tokens, text context 32,
vocab 4096, both towers width 256, 4 layers, 4 heads, MLP 1024, QuickGELU, projection 256;
float32) from the same weights (the transformers model's, converted with
`mmjax.convert.clip`) on the same batches (random pixels; right-padded random token ids of
different lengths with the end-of-text id last), with the same AdamW (lr, betas, eps, weight
decay on every parameter, as `torch.optim.AdamW(model.parameters())` does).

  * mmjax: `CLIP` + `mmjax.ops.losses.clip_loss`, `optax.adamw`, one `jax.jit` step with the
    params and optimizer state donated; the only host sync is reading the loss at the end. It
    is compiled with the XLA options `mmjax train` gives a float32 step (`mmjax.xla_options`;
    `xla_options=False` drops them); the same step without them is timed in turn with the
    others (`xla_options_ab`), which gives their A/B speed-up (`xla_options_speedup`).
  * reference: `CLIPModel(..., return_loss=True)` in train mode with its default attention
    (SDPA), `loss.backward()`, `torch.optim.AdamW.step()`, `zero_grad(set_to_none=True)`, with
    torch's default thread count.

Throughput is the median over `repeats` windows of `steps` steps after `warmup` steps; the
two sides' windows alternate (mmjax, reference, mmjax, ...) so that load from other processes
on a shared machine falls on both alike. mmjax's first step, which compiles, is reported
separately. The two sides' losses are compared at the first step (`first_loss_abs_diff`) and
after the last timed step (`last_loss_abs_diff`, both sides having taken the same steps on the
same batches): same weights, data and optimizer, so they agree to float32 rounding -- the two
programs train the same model.

`reference_threads_sweep` (on by default) also times the reference with torch limited to one
thread (then restores the default): on a loaded machine torch's OpenMP threads can lose much
more than a single thread does, and the figure shows how much of the ratio that accounts for.
The headline `ratio` always uses torch's default thread count.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import numpy as np

DEFAULT_MODEL = dict(
    image_size=64, patch_size=8, vision_dim=256, vision_layers=4, vision_heads=4, vision_mlp=1024,
    vocab_size=4096, max_len=32, text_dim=256, text_layers=4, text_heads=4, text_mlp=1024,
    projection_dim=256, activation="quick_gelu",
)
LR, B1, B2, EPS, WD = 1e-4, 0.9, 0.999, 1e-8, 0.01


def run(batch: int = 32, steps: int = 5, repeats: int = 3, warmup: int = 2,
        model: dict[str, Any] | None = None, seed: int = 0,
        reference_threads_sweep: bool = True, xla_options: bool = True,
        xla_options_ab: bool = True) -> dict[str, Any]:
    import torch
    import transformers

    spec = {**DEFAULT_MODEL, **(model or {})}
    hf_model = _hf_model(spec, seed)
    batches = _batches(spec, batch, seed)
    from mmjax.xla_options import step_compiler_options

    options = step_compiler_options("float32") if xla_options else None
    ours_step, ours_first, ours_loss0, n_params = _mmjax_trainer(hf_model, batches, options)
    # the same step compiled without mmjax's XLA options (their A/B), converted before torch trains
    plain_step = _mmjax_trainer(hf_model, batches, None)[0] if options and xla_options_ab else None
    ref_step, ref_loss0 = _torch_trainer(hf_model, batches)  # trains hf_model in place (after conversion)
    last_ours = last_ref = None
    for _ in range(warmup):
        last_ours, last_ref = ours_step(), ref_step()
        if plain_step:
            plain_step()
    ours_times, ref_times, plain_times = [], [], []
    for _ in range(repeats):  # alternate, so all sides see the same background load
        t, last_ours = _timed(ours_step, steps)
        ours_times.append(t)
        t, last_ref = _timed(ref_step, steps)
        ref_times.append(t)
        if plain_step:
            plain_times.append(_timed(plain_step, steps)[0])
    t_ours, t_ref = statistics.median(ours_times), statistics.median(ref_times)
    case = {
        "batch": batch, "dtype": "float32",
        "mmjax_images_per_s": batch / t_ours, "reference_images_per_s": batch / t_ref,
        "ratio": t_ref / t_ours, "mmjax_step_s": t_ours, "reference_step_s": t_ref,
        "mmjax_first_step_s": ours_first, "mmjax_compiler_options": options,
        **({"mmjax_without_options_images_per_s": batch / statistics.median(plain_times),
            "xla_options_speedup": statistics.median(plain_times) / t_ours} if plain_times else {}),
        "first_loss_mmjax": ours_loss0, "first_loss_reference": ref_loss0,
        "first_loss_abs_diff": abs(ours_loss0 - ref_loss0),
        "steps_taken": 1 + warmup + repeats * steps,
        "last_loss_mmjax": last_ours, "last_loss_reference": last_ref,
        "last_loss_abs_diff": None if last_ours is None else abs(last_ours - last_ref),
        "mmjax_step_s_all": ours_times, "reference_step_s_all": ref_times,
    }
    if reference_threads_sweep and torch.get_num_threads() > 1:
        default_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ref_step()
            one, ours_again = [], []
            for _ in range(repeats):
                ours_again.append(_timed(ours_step, steps)[0])
                one.append(_timed(ref_step, steps)[0])
        finally:
            torch.set_num_threads(default_threads)
        case["reference_1_thread_images_per_s"] = batch / statistics.median(one)
        case["ratio_vs_1_thread_reference"] = statistics.median(one) / statistics.median(ours_again)
    return {
        "name": "clip",
        "reference": f"transformers {transformers.__version__} CLIPModel(return_loss=True) + "
                     f"torch.optim.AdamW (torch {torch.__version__}, {torch.get_num_threads()} threads, "
                     f"{hf_model.config._attn_implementation} attention)",
        "model": {**spec, "num_params": n_params},
        "optimizer": {"lr": LR, "b1": B1, "b2": B2, "eps": EPS, "weight_decay": WD},
        "ratio": case["ratio"],
        "cases": [case],
    }


def _timed(step, n: int) -> tuple[float, float]:
    """(seconds per step over n steps, the last step's loss)."""
    t0 = time.perf_counter()
    for _ in range(n):
        loss = step()
    return (time.perf_counter() - t0) / n, loss


def _hf_model(spec: dict[str, Any], seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    v = spec["vocab_size"]
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=v, hidden_size=spec["text_dim"], intermediate_size=spec["text_mlp"],
                         num_hidden_layers=spec["text_layers"], num_attention_heads=spec["text_heads"],
                         max_position_embeddings=spec["max_len"], hidden_act=spec["activation"],
                         bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=0),
        vision_config=dict(hidden_size=spec["vision_dim"], intermediate_size=spec["vision_mlp"],
                           num_hidden_layers=spec["vision_layers"], num_attention_heads=spec["vision_heads"],
                           image_size=spec["image_size"], patch_size=spec["patch_size"],
                           hidden_act=spec["activation"]),
        projection_dim=spec["projection_dim"],
    )
    return transformers.CLIPModel(config)


def _batches(spec: dict[str, Any], batch: int, seed: int, count: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    v, t, s = spec["vocab_size"], spec["max_len"], spec["image_size"]
    out = []
    for _ in range(count):
        tokens = rng.integers(1, v - 2, size=(batch, t))
        lengths = rng.integers(t // 4, t + 1, size=batch)
        mask = np.arange(t)[None, :] < lengths[:, None]
        tokens[np.arange(batch), lengths - 1] = v - 1  # end of text
        tokens[~mask] = 0
        out.append({"pixels_nchw": rng.normal(size=(batch, 3, s, s)).astype(np.float32),
                    "tokens": tokens.astype(np.int64), "mask": mask})
    return out


def _mmjax_trainer(hf_model, batches, compiler_options=None):
    import jax
    import jax.numpy as jnp
    import optax

    from mmjax.convert import from_hf
    from mmjax.ops.losses import clip_loss

    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        module, params = from_hf(tmp)
    tx = optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
    opt_state = tx.init(params)

    def loss_fn(p, images, tokens, mask):
        out = module.apply({"params": p}, images, tokens, input_mask=mask)
        return clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])

    def step_fn(p, state, images, tokens, mask):
        loss, grads = jax.value_and_grad(loss_fn)(p, images, tokens, mask)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    step_jit = jax.jit(step_fn, donate_argnums=(0, 1), compiler_options=compiler_options)
    device_batches = [(jnp.asarray(b["pixels_nchw"].transpose(0, 2, 3, 1)), jnp.asarray(b["tokens"], jnp.int32),
                       jnp.asarray(b["mask"])) for b in batches]
    box = {"params": params, "state": opt_state, "i": 0}

    def step():
        images, tokens, mask = device_batches[box["i"] % len(device_batches)]
        box["params"], box["state"], loss = step_jit(box["params"], box["state"], images, tokens, mask)
        box["i"] += 1
        return float(loss)  # the one host sync per step

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    t0 = time.perf_counter()
    loss0 = step()
    first = time.perf_counter() - t0
    return step, first, loss0, n_params


def _torch_trainer(hf_model, batches):
    import torch

    model = hf_model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    data = [(torch.from_numpy(b["pixels_nchw"]), torch.from_numpy(b["tokens"]),
             torch.from_numpy(b["mask"].astype(np.int64))) for b in batches]
    box = {"i": 0}

    def step():
        pixels, tokens, mask = data[box["i"] % len(data)]
        box["i"] += 1
        loss = model(input_ids=tokens, pixel_values=pixels, attention_mask=mask, return_loss=True).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    loss0 = step()
    return step, loss0
