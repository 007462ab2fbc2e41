"""Load a trained workdir for inference: (module, params, tokenizer or None)."""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn

from mmjax import checkpoint
from mmjax.errors import InputError


def load_for_inference(workdir: str) -> tuple[nn.Module, Any, Any]:
    """The model module, the latest checkpoint's params and the workdir's sentencepiece
    tokenizer (None when the run had none, e.g. an image classifier).

    Raises InputError when `workdir` is not a training workdir or holds no checkpoint.
    """
    model, _, params = checkpoint.load_workdir(workdir)
    tok_path = os.path.join(workdir, checkpoint.WORKDIR_TOKENIZER_FILE)
    tokenizer = load_tokenizer(tok_path) if os.path.isfile(tok_path) else None
    return model, params, tokenizer


def load_tokenizer(path: str) -> Any:
    from mmjax.data.tokenizer import Tokenizer

    if not os.path.isfile(path):
        raise InputError(f"no tokenizer at {path}")
    return Tokenizer.load(path)
