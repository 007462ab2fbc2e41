"""`mmjax compare / convert / export`: parity against the PyTorch reference and directory I/O.

`compare(hf_dir)` loads a Hugging Face checkpoint twice -- as the transformers PyTorch model
(float32, eager attention) and as the converted mmjax model -- feeds both the same random
inputs and reports the largest absolute difference of each output on real (non-padding)
tokens.

Tolerance: 1e-4 absolute, in float32. Both sides compute the same function; they differ only
in floating-point summation order (MKL vs XLA dot products, fused vs unfused RMSNorm and
softmax). Each dot product of length K carries a relative rounding error of about
eps * sqrt(K) (eps = 1.2e-7 for float32), and the errors of successive residual blocks add up
roughly like a random walk, i.e. grow ~ sqrt(depth). Measured on the 2-layer, hidden-64
random-weight test models (logits up to ~2.7, all tensors randomised): 1.1e-6 to 1.6e-6 on
logits and 1.5e-6 to 2.9e-6 on hidden states, so 1e-4 leaves ~50x headroom, while any real conversion bug -- a
transposed or mis-reshaped projection, a RoPE layout or scaling mistake, an off-by-one sliding
window, padding that leaks into attention -- moves outputs by 1e-2 or more. The mmjax side runs
with `jax.default_matmul_precision("highest")` so TF32 on GPUs does not count as a difference.
Large real checkpoints (hidden states in the hundreds) can exceed an absolute 1e-4 through
rounding alone; the per-output diffs in the report show where.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

import numpy as np

from mmjax.errors import InputError, MmjaxError

TOLERANCE = 1e-4


def compare(hf_dir: str, batch: int = 2, seq_len: int = 16, seed: int = 0) -> dict[str, Any]:
    """Run the HF reference and the converted mmjax model on the same random inputs.

    Returns {"model_type", "architecture", "max_abs_diff", "tolerance", "passed", "diffs"
    (output name -> max |diff|), "reference" ("transformers <version>"), "inputs" (what was
    fed), ...}. Raises MmjaxError subclasses for bad input.
    """
    from mmjax.convert import read_hf
    from mmjax.models import build_model

    if batch < 1:
        raise InputError(f"--batch must be >= 1, got {batch}")
    if seq_len < 1:
        raise InputError(f"--seq-len must be >= 1, got {seq_len}")
    converter, hf_config, config, np_params = read_hf(hf_dir)
    module, config = build_model(converter.family, config)
    runner = _RUNNERS.get(converter.task)
    if runner is None:
        raise MmjaxError(f"mmjax compare has no reference runner for task {converter.task!r}")
    torch, transformers = _import_reference()
    diffs, extra = runner(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers)
    max_diff = max(diffs.values())
    return {
        "model_type": hf_config["model_type"],
        "architecture": (hf_config.get("architectures") or [None])[0],
        "max_abs_diff": max_diff,
        "tolerance": TOLERANCE,
        "passed": bool(max_diff <= TOLERANCE),
        "diffs": diffs,
        "reference": f"transformers {transformers.__version__}",
        **extra,
    }


def _import_reference():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise MmjaxError(
            f"mmjax compare needs torch and transformers ({e}); install mmjax with its 'test' extra"
        ) from None
    return torch, transformers


def _max_abs(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """max |a - b| over the positions where mask [batch, seq] is True."""
    diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    return float(diff[mask].max()) if mask.any() else 0.0


def _compare_causal_lm(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """Logits and every hidden state of a causal LM, with one left-padded row."""
    import jax
    import jax.numpy as jnp

    if seq_len > config.max_len:
        raise InputError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {config.max_len}")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(batch, seq_len), dtype=np.int64)
    mask = np.ones((batch, seq_len), bool)
    num_pad = min(max(1, seq_len // 4), seq_len - 1)
    if num_pad > 0:
        mask[-1, :num_pad] = False  # left padding on the last row, as batched generation does
        tokens[-1, :num_pad] = config.pad_token_id if config.pad_token_id is not None else 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # position ids count real tokens only

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf_model(
            input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=torch.from_numpy(positions), output_hidden_states=True,
        )
    ref_hidden = [h.numpy() for h in ref.hidden_states]

    params = jax.tree_util.tree_map(jnp.asarray, np_params)
    apply = jax.jit(lambda p, t, m: module.apply({"params": p}, t, input_mask=m, return_intermediates=True))
    with jax.default_matmul_precision("highest"):
        logits, inter = apply(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask))
    # HF's last hidden state is after the final norm; mmjax keeps that one as final_hidden
    ours = list(inter["hidden_states"][:-1]) + [inter["final_hidden"]]
    if len(ours) != len(ref_hidden):
        raise MmjaxError(f"hidden state count differs: mmjax {len(ours)}, reference {len(ref_hidden)}")
    layer_diffs = [_max_abs(a, b, mask) for a, b in zip(ours, ref_hidden)]
    diffs = {
        "embeddings": layer_diffs[0],
        "hidden_states": max(layer_diffs),
        "logits": _max_abs(logits, ref.logits.numpy(), mask),
    }
    extra = {
        "hidden_state_diffs": layer_diffs,
        "inputs": {"batch": batch, "seq_len": seq_len, "seed": seed, "left_padding_last_row": num_pad},
        "reference_logits_max_abs": float(np.abs(ref.logits.numpy()[mask]).max()),
    }
    return diffs, extra


def _random_images(rng, batch: int, vision_config) -> np.ndarray:
    """Normalised-looking random images, NCHW as transformers takes them."""
    h, w = vision_config.image_hw
    return rng.normal(size=(batch, vision_config.channels, h, w)).astype(np.float32)


def _max_abs_all(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _compare_image_encoder(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """ViTModel / CLIPVisionModel / SiglipVisionModel (pooler output, last hidden state) and
    ViTForImageClassification (logits), and every hidden state, on random images (mmjax gets
    them NHWC)."""
    import jax
    import jax.numpy as jnp

    from mmjax.convert import hf_io

    arch = (hf_io.read_config(hf_dir).get("architectures") or ["ViTModel"])[0]
    images = _random_images(np.random.default_rng(seed), batch, config)
    hf_model = getattr(transformers, arch).from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf_model(pixel_values=torch.from_numpy(images), output_hidden_states=True)
    params = jax.tree_util.tree_map(jnp.asarray, np_params)
    apply = jax.jit(lambda p, x: module.apply({"params": p}, x, return_intermediates=True))
    with jax.default_matmul_precision("highest"):
        output, inter = apply(params, jnp.asarray(images.transpose(0, 2, 3, 1)))
    layer_diffs = [_max_abs_all(a, b.numpy()) for a, b in zip(inter["hidden_states"], ref.hidden_states)]
    if len(inter["hidden_states"]) != len(ref.hidden_states):
        raise MmjaxError(f"hidden state count differs: mmjax {len(inter['hidden_states'])}, "
                         f"reference {len(ref.hidden_states)}")
    diffs = {"embeddings": layer_diffs[0], "hidden_states": max(layer_diffs)}
    if config.num_classes:
        diffs["logits"] = _max_abs_all(output, ref.logits.numpy())
    else:
        # CLIPVisionModel's last_hidden_state is the encoder output before post_layernorm
        ours_last = inter["hidden_states"][-1] if arch == "CLIPVisionModel" else inter["final_hidden"]
        diffs["last_hidden_state"] = _max_abs_all(ours_last, ref.last_hidden_state.numpy())
        diffs["pooler_output"] = _max_abs_all(output, ref.pooler_output.numpy())
    extra = {"hidden_state_diffs": layer_diffs,
             "inputs": {"batch": batch, "image_size": list(config.image_hw), "seed": seed}}
    return diffs, extra


def _clip_text_inputs(rng, batch: int, seq_len: int, text_config) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [batch, seq_len] with the end-of-text token at a different place per row and
    right padding after it, and the matching attention mask. When `eos_token_id` lies outside
    the vocabulary (transformers' small test configs keep CLIP's 49407 beside a tiny vocab) no
    row can hold it and both sides pool at position 0, as transformers does."""
    c = text_config
    vocab = c.vocab_size
    pad = c.pad_token_id if c.pad_token_id is not None and 0 <= c.pad_token_id < vocab else 0
    if c.eos_pooling == "argmax":
        end_id = vocab - 1  # pooled at the largest id
        tokens = rng.integers(0, vocab - 1, size=(batch, seq_len))
    else:
        end_id = c.eos_token_id if 0 <= c.eos_token_id < vocab else None
        tokens = rng.integers(0, vocab, size=(batch, seq_len))
        if end_id is not None:
            tokens[tokens == end_id] = (end_id + 1) % vocab
    mask = np.ones((batch, seq_len), bool)
    for i in range(batch):
        end = seq_len - 1 - (i * max(1, seq_len // 4)) % seq_len
        if end_id is not None:
            tokens[i, end] = end_id
        tokens[i, end + 1:] = pad
        mask[i, end + 1:] = False
    return tokens.astype(np.int64), mask


def _compare_clip(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """CLIPModel: normalised image and text embeddings, logits_per_image, both towers' hidden
    states (text ones on real tokens), with right-padded text of different lengths."""
    import jax
    import jax.numpy as jnp

    seq_len = min(seq_len, config.text.max_len)
    rng = np.random.default_rng(seed)
    images = _random_images(rng, batch, config.vision)
    tokens, mask = _clip_text_inputs(rng, batch, seq_len, config.text)
    hf_model = transformers.CLIPModel.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(images),
                       attention_mask=torch.from_numpy(mask.astype(np.int64)), output_hidden_states=True)
    params = jax.tree_util.tree_map(jnp.asarray, np_params)
    apply = jax.jit(lambda p, x, t, m: module.apply({"params": p}, x, t, input_mask=m,
                                                    return_intermediates=True))
    with jax.default_matmul_precision("highest"):
        out, inter = apply(params, jnp.asarray(images.transpose(0, 2, 3, 1)),
                           jnp.asarray(tokens, jnp.int32), jnp.asarray(mask))
    vref, tref = ref.vision_model_output, ref.text_model_output
    vision_diffs = [_max_abs_all(a, b.numpy()) for a, b in zip(inter["vision"]["hidden_states"], vref.hidden_states)]
    text_diffs = [_max_abs(a, b.numpy(), mask) for a, b in zip(inter["text"]["hidden_states"], tref.hidden_states)]
    diffs = {
        "image_embeds": _max_abs_all(out["image_embeds"], ref.image_embeds.numpy()),
        "text_embeds": _max_abs_all(out["text_embeds"], ref.text_embeds.numpy()),
        "logits_per_image": _max_abs_all(out["logits_per_image"], ref.logits_per_image.numpy()),
        "vision_hidden_states": max(vision_diffs),
        "text_hidden_states": max(text_diffs),
        "text_last_hidden_state": _max_abs(inter["text"]["final_hidden"], tref.last_hidden_state.numpy(), mask),
    }
    extra = {"vision_hidden_state_diffs": vision_diffs, "text_hidden_state_diffs": text_diffs,
             "inputs": {"batch": batch, "seq_len": seq_len, "image_size": list(config.vision.image_hw),
                        "seed": seed, "text_lengths": mask.sum(1).tolist()},
             "reference_logits_max_abs": float(np.abs(ref.logits_per_image.numpy()).max())}
    return diffs, extra


def _compare_text_encoder(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """CLIPTextModel: pooler output (at the end-of-text token), last hidden state and every
    hidden state on real tokens, with right-padded rows of different lengths."""
    import jax
    import jax.numpy as jnp

    seq_len = min(seq_len, config.max_len)
    tokens, mask = _clip_text_inputs(np.random.default_rng(seed), batch, seq_len, config)
    hf_model = transformers.CLIPTextModel.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                       output_hidden_states=True)
    params = jax.tree_util.tree_map(jnp.asarray, np_params)
    apply = jax.jit(lambda p, t, m: module.apply({"params": p}, t, input_mask=m, return_intermediates=True))
    with jax.default_matmul_precision("highest"):
        pooled, inter = apply(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask))
    layer_diffs = [_max_abs(a, b.numpy(), mask) for a, b in zip(inter["hidden_states"], ref.hidden_states)]
    if len(inter["hidden_states"]) != len(ref.hidden_states):
        raise MmjaxError(f"hidden state count differs: mmjax {len(inter['hidden_states'])}, "
                         f"reference {len(ref.hidden_states)}")
    diffs = {"pooler_output": _max_abs_all(pooled, ref.pooler_output.numpy()),
             "last_hidden_state": _max_abs(inter["final_hidden"], ref.last_hidden_state.numpy(), mask),
             "hidden_states": max(layer_diffs)}
    extra = {"hidden_state_diffs": layer_diffs,
             "inputs": {"batch": batch, "seq_len": seq_len, "seed": seed, "text_lengths": mask.sum(1).tolist()}}
    return diffs, extra


def _compare_siglip(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """SiglipModel: normalised embeddings, logits (scale and bias), the image tower's pooled
    (attention-pooling head) output and both towers' hidden states. SigLIP's text is padded to
    its full length and read without an attention mask, as the model was trained."""
    import jax
    import jax.numpy as jnp

    seq_len = min(seq_len, config.text.max_len)
    rng = np.random.default_rng(seed)
    images = _random_images(rng, batch, config.vision)
    tokens = rng.integers(0, config.text.vocab_size, size=(batch, seq_len)).astype(np.int64)
    hf_model = transformers.SiglipModel.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(images),
                       output_hidden_states=True)
    params = jax.tree_util.tree_map(jnp.asarray, np_params)
    apply = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t, return_intermediates=True))
    with jax.default_matmul_precision("highest"):
        out, inter = apply(params, jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(tokens, jnp.int32))
    vref, tref = ref.vision_model_output, ref.text_model_output
    vision_diffs = [_max_abs_all(a, b.numpy()) for a, b in zip(inter["vision"]["hidden_states"], vref.hidden_states)]
    text_diffs = [_max_abs_all(a, b.numpy()) for a, b in zip(inter["text"]["hidden_states"], tref.hidden_states)]
    diffs = {
        "image_embeds": _max_abs_all(out["image_embeds"], ref.image_embeds.numpy()),
        "text_embeds": _max_abs_all(out["text_embeds"], ref.text_embeds.numpy()),
        "logits_per_image": _max_abs_all(out["logits_per_image"], ref.logits_per_image.numpy()),
        "vision_pooler_output": _max_abs_all(inter["vision"]["pooled"], vref.pooler_output.numpy()),
        "vision_hidden_states": max(vision_diffs),
        "text_hidden_states": max(text_diffs),
    }
    extra = {"vision_hidden_state_diffs": vision_diffs, "text_hidden_state_diffs": text_diffs,
             "inputs": {"batch": batch, "seq_len": seq_len, "image_size": list(config.vision.image_hw),
                        "seed": seed},
             "reference_logits_max_abs": float(np.abs(ref.logits_per_image.numpy()).max())}
    return diffs, extra


# converter.task -> function running the reference and mmjax and returning (diffs, extra)
_RUNNERS: dict[str, Callable[..., tuple[dict[str, float], dict[str, Any]]]] = {
    "causal_lm": _compare_causal_lm,
    "image_encoder": _compare_image_encoder,
    "contrastive_image_text": _compare_clip,
    "text_encoder": _compare_text_encoder,
    "siglip": _compare_siglip,
}


def convert_dir(hf_dir: str, out_dir: str) -> None:
    """Hugging Face directory -> mmjax model directory (Orbax params + model.json)."""
    import jax
    import jax.numpy as jnp

    from mmjax.checkpoint import save_model_dir
    from mmjax.convert import read_hf

    converter, hf_config, config, np_params = read_hf(hf_dir)
    params = jax.tree_util.tree_map(jnp.asarray, np_params)
    metadata = {"hf_model_type": hf_config["model_type"],
                "hf_architectures": list(hf_config.get("architectures") or [])}
    save_model_dir(out_dir, converter.family, config, params, metadata=metadata)


def export_dir(ckpt_dir: str, hf_out_dir: str) -> None:
    """mmjax model directory (from `convert_dir`) or training workdir -> Hugging Face directory.

    The HF model_type recorded at conversion is kept (e.g. a Mistral stays Mistral); a training
    workdir's sentencepiece `tokenizer.model` is copied along.
    """
    from mmjax import checkpoint
    from mmjax.convert import to_hf

    if os.path.exists(hf_out_dir) and not os.path.isdir(hf_out_dir):
        raise InputError(f"{hf_out_dir!r} exists and is not a directory")
    tokenizer_file = None
    if checkpoint.is_model_dir(ckpt_dir):
        info = checkpoint.read_model_info(ckpt_dir)
        _, config, params = checkpoint.load_model_dir(ckpt_dir)
        family = info["family"]
        model_type = (info.get("metadata") or {}).get("hf_model_type")
    elif os.path.isfile(os.path.join(ckpt_dir, "mmjax_model.json")):
        from mmjax.train.inference import load_for_inference
        from mmjax.train.loop import MODEL_FILE, TOKENIZER_FILE

        module, params, _ = load_for_inference(ckpt_dir)
        with open(os.path.join(ckpt_dir, MODEL_FILE)) as f:
            family = json.load(f)["family"]
        config, model_type = module.config, None
        tokenizer_file = os.path.join(ckpt_dir, TOKENIZER_FILE)
    elif not os.path.isdir(ckpt_dir):
        raise InputError(f"checkpoint directory {ckpt_dir!r} does not exist")
    else:
        raise InputError(f"{ckpt_dir!r} is neither an mmjax model directory (model.json) nor a "
                         "training workdir (mmjax_model.json)")
    to_hf(config, params, hf_out_dir, family=family, model_type=model_type)
    if tokenizer_file and os.path.isfile(tokenizer_file):
        shutil.copyfile(tokenizer_file, os.path.join(hf_out_dir, "tokenizer.model"))
