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

This module is the generic driver (read the directory, build the model, call the family's
runner `Converter.compare`, apply the tolerance); what is fed and compared for each family is
in that family's converter file, the shared pieces in `mmjax.convert.reference`.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from mmjax.errors import InputError, MmjaxError

TOLERANCE = 1e-4


def compare(hf_dir: str, batch: int = 2, seq_len: int = 16, seed: int = 0,
            adapter: str | None = None, download: bool = False) -> dict[str, Any]:
    """Run the HF reference and the converted mmjax model on the same random inputs.

    hf_dir, adapter: directories, or Hub ids `org/name[@revision]` from huggingface_hub's cache
    (`download=True` fetches missing ones; `mmjax.convert.hf_io.resolve`).

    Returns {"model_type", "architecture", "max_abs_diff", "tolerance", "passed", "diffs"
    (output name -> max |diff|), "reference" ("transformers <version>"), "inputs" (what was
    fed), ...}. Raises MmjaxError subclasses for bad input.

    adapter: a peft LoRA adapter directory; then the reference is
    `PeftModel.from_pretrained(base, adapter)` and the mmjax side runs the base params plus the
    adapter's LoRA leaves under `mmjax.nn.lora.lora` (unmerged); the report gains "adapter"
    (path, r, alpha, scale, use_rslora, modules) and "reference" names peft too.
    """
    from mmjax.convert import hf_io, read_hf
    from mmjax.models import build_model

    if batch < 1:
        raise InputError(f"--batch must be >= 1, got {batch}")
    if seq_len < 1:
        raise InputError(f"--seq-len must be >= 1, got {seq_len}")
    hf_dir = hf_io.resolve(hf_dir, download=download)
    if adapter is not None:
        adapter = hf_io.resolve(adapter, download=download)
    converter, hf_config, config, np_params = read_hf(hf_dir)
    module, config = build_model(converter.family, config)
    if converter.compare is None:
        raise MmjaxError(f"mmjax compare has no reference runner for model_type {hf_config['model_type']!r}")
    torch, transformers = _import_reference()
    reference_name = f"transformers {transformers.__version__}"
    adapter_report = None
    runner_module, runner_transformers = module, transformers
    if adapter is not None:
        np_params, runner_module, runner_transformers, adapter_report = _with_adapter(
            adapter, hf_config, config, np_params, module, transformers)
        reference_name += f" + peft {adapter_report.pop('peft_version')}"
    # the family's runner (`Converter.compare`, in its converter file) builds the inputs and
    # runs both sides
    diffs, extra = converter.compare(hf_dir, runner_module, config, np_params, batch, seq_len, seed,
                                     torch, runner_transformers)
    if adapter_report is not None:
        extra = {**extra, "adapter": adapter_report}
    max_diff = max(diffs.values())
    return {
        "model_type": hf_config["model_type"],
        "architecture": (hf_config.get("architectures") or [None])[0],
        "max_abs_diff": max_diff,
        "tolerance": TOLERANCE,
        "passed": bool(max_diff <= TOLERANCE),
        "diffs": diffs,
        "reference": reference_name,
        **extra,
    }


def _with_adapter(adapter_dir, hf_config, config, np_params, module, transformers):
    """(params + LoRA leaves, module running under the adapter's LoraConfig, transformers as
    the runner sees it (model classes load base + PeftModel), the report's "adapter" entry)."""
    from mmjax.convert import peft as peft_io

    peft = peft_io.import_peft()
    params, adapter = peft_io.load_adapter(adapter_dir, np_params, config, hf_config["model_type"],
                                           tuple(hf_config.get("architectures") or ()))
    cfg = adapter.config
    report = {"path": adapter_dir, "peft_type": "LORA", "r": cfg.r, "alpha": cfg.alpha,
              "scale": cfg.scale, "use_rslora": cfg.use_rslora,
              "num_modules": len(adapter.modules),
              "target_modules": adapter.peft_config.get("target_modules"),
              "peft_version": peft.__version__}
    return (params, peft_io.LoraModule(module, cfg),
            peft_io.PeftReference(transformers, adapter_dir, peft), report)


def _import_reference():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise MmjaxError(
            f"mmjax compare needs torch and transformers ({e}); install mmjax with its 'test' extra"
        ) from None
    return torch, transformers


def convert_dir(hf_dir: str, out_dir: str, download: bool = False) -> None:
    """Hugging Face directory (or Hub id, `hf_io.resolve`) -> mmjax model directory (Orbax
    params + model.json)."""
    import jax
    import jax.numpy as jnp

    from mmjax.checkpoint import save_model_dir
    from mmjax.convert import read_hf

    converter, hf_config, config, np_params = read_hf(hf_dir, download=download)
    params = jax.tree_util.tree_map(jnp.asarray, np_params)
    metadata = {"hf_model_type": hf_config["model_type"],
                "hf_architectures": list(hf_config.get("architectures") or [])}
    save_model_dir(out_dir, converter.family, config, params, metadata=metadata)


def export_dir(ckpt_dir: str, hf_out_dir: str, part: str | None = None) -> str | None:
    """mmjax model directory (from `convert_dir`) or training workdir -> Hugging Face directory.

    The HF model_type recorded at conversion is kept (e.g. a Mistral stays Mistral); a training
    workdir's sentencepiece `tokenizer.model` is copied along. A workdir of a family with
    several exportable models (`Family.export_parts`: I-JEPA's "target" and "context" encoders)
    writes `part`, by default the family's first; returns the part written (None: the model).
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
    elif checkpoint.is_workdir(ckpt_dir):
        _, config, params = checkpoint.load_workdir(ckpt_dir)
        family = checkpoint.read_workdir_info(ckpt_dir)["family"]
        model_type = None
        tokenizer_file = os.path.join(ckpt_dir, checkpoint.WORKDIR_TOKENIZER_FILE)
        family, config, params, part = _export_part(ckpt_dir, family, config, params, part)
    elif not os.path.isdir(ckpt_dir):
        raise InputError(f"checkpoint directory {ckpt_dir!r} does not exist")
    else:
        raise InputError(f"{ckpt_dir!r} is neither an mmjax model directory (model.json) nor a "
                         "training workdir (mmjax_model.json)")
    if part is not None and not checkpoint.is_workdir(ckpt_dir):
        raise InputError(f"--part {part!r}: only a training workdir holds several models; {ckpt_dir!r} is a "
                         "model directory")
    to_hf(config, params, hf_out_dir, family=family, model_type=model_type)
    if tokenizer_file and os.path.isfile(tokenizer_file):
        shutil.copyfile(tokenizer_file, os.path.join(hf_out_dir, "tokenizer.model"))
    return part


def _export_part(workdir: str, family: str, config: Any, params: Any, part: str | None):
    """(family, config, params, part) of the model a workdir exports (see `export_dir`)."""
    from mmjax import checkpoint
    from mmjax.models import families

    split = families()[family].export_parts
    if split is None:
        if part is not None:
            raise InputError(f"--part {part!r}: a {family!r} workdir holds one model; leave --part out")
        return family, config, params, None
    parts = split(config, params, checkpoint.load_workdir_task_state(workdir))
    part = next(iter(parts)) if part is None else part
    if part not in parts:
        raise InputError(f"--part {part!r}: a {family!r} workdir exports {', '.join(map(repr, parts))}")
    return (*parts[part], part)


def export_adapter_dir(workdir: str, out_dir: str) -> dict[str, Any]:
    """A LoRA training workdir (`peft.json`, `mmjax.train.peft`) -> a peft adapter directory
    that `PeftModel.from_pretrained(base, out_dir)` loads onto the exported base model. An
    adapter trained on a bfloat16 / int8 frozen base is written as trained, for the float32
    base (as QLoRA adapters are used). Returns the adapter_config dict."""
    from mmjax import checkpoint
    from mmjax.convert import peft as peft_io
    from mmjax.nn.lora import LoraConfig

    if not checkpoint.is_workdir(workdir):
        raise InputError(f"--adapter: {workdir!r} is not a training workdir (mmjax_model.json)")
    record = checkpoint.read_peft_record(workdir)
    if record is None or record.get("method") != "lora":
        raise InputError(f"--adapter: {workdir!r} is not a LoRA run (its {checkpoint.PEFT_FILE} "
                         f"says {None if record is None else record.get('method')!r}); export the "
                         "model without --adapter")
    _, config, params = checkpoint.load_workdir(workdir, fold=False)
    from mmjax.nn import quant

    params = quant.dequantize_kernels(params)
    return peft_io.export_adapter(params, LoraConfig(**record["lora"]), config, out_dir)
