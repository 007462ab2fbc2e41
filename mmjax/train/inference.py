"""Load a trained workdir for inference: (module, params, tokenizer or None)."""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn

from mmjax.errors import InputError
from mmjax.models import abstract_params, build_model
from mmjax.ops.attention import decoding_implementation
from mmjax.train.checkpointing import Checkpointer
from mmjax.train.loop import CHECKPOINT_DIR, MODEL_FILE, TOKENIZER_FILE


def load_for_inference(workdir: str) -> tuple[nn.Module, Any, Any]:
    """The model module, the latest checkpoint's params and the workdir's sentencepiece
    tokenizer (None when the run had none, e.g. an image classifier).

    Raises InputError when `workdir` is not a training workdir or holds no checkpoint.
    """
    model_file = os.path.join(workdir, MODEL_FILE)
    if not os.path.isfile(model_file):
        raise InputError(f"{workdir!r} is not a training workdir (no {MODEL_FILE})")
    with open(model_file) as f:
        spec = json.load(f)
    family = spec.get("family")
    config = dict(spec.get("config") or {})
    if "attention_impl" in config:
        config["attention_impl"] = decoding_implementation(config["attention_impl"])
    model, config = build_model(family, config)
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(ckpt_dir):
        raise InputError(f"{workdir!r} holds no checkpoint yet ({ckpt_dir} missing)")
    ckpt = Checkpointer(ckpt_dir, keep=1000)
    try:
        if ckpt.latest_step() is None:
            raise InputError(f"{workdir!r} holds no checkpoint yet")
        params = ckpt.restore_params(None, abstract_params(family, model, config))
    finally:
        ckpt.close()
    tok_path = os.path.join(workdir, TOKENIZER_FILE)
    tokenizer = load_tokenizer(tok_path) if os.path.isfile(tok_path) else None
    return model, params, tokenizer


def load_tokenizer(path: str) -> Any:
    from mmjax.data.tokenizer import Tokenizer

    if not os.path.isfile(path):
        raise InputError(f"no tokenizer at {path}")
    return Tokenizer.load(path)
