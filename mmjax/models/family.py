"""The record a model family declares once, next to its model (`FAMILIES = (Family(...),)` at
the bottom of `mmjax/models/<family>.py`). Every registry by family name (`build_model`,
checkpoints, tasks, conversion, export) is derived from these records by
`mmjax.models.families()`, which discovers them; nothing else lists the families.

The Hugging Face side of a family (architectures, config/weight conversion, what
`mmjax compare` feeds and compares) is declared the same way in its converter file
(`mmjax/convert/<family>.py`, `mmjax.convert.core.Converter`), keyed by the family name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    name: the family name (`build_model(name, config)`, recorded in checkpoints and workdirs).
    config_class: its dataclass config (`from_dict`, `to_dict`, `replace`).
    module_class: the Linen module, built as `module_class(config)`.
    example_inputs: config -> positional inputs of a smallest `module.init` call that creates
      every param (batch 1; shapes only matter).
    summary: one line for `mmjax` listings and docs.
    tasks: the training tasks (`mmjax.train.task.TASKS` names) that can train this family; a
      task refuses a model whose family does not list it.
    export_parts: for a family whose workdir holds several exportable models (I-JEPA: the
      EMA target encoder in the task state, the context encoder in the params):
      (config, params, task_state or None) -> {part name: (family, config, params)}, the
      default part first; `mmjax export WORKDIR OUT --part NAME` writes one of them.
    """

    name: str
    config_class: type
    module_class: type
    example_inputs: Callable[[Any], tuple]
    summary: str = ""
    tasks: tuple[str, ...] = ()
    export_parts: Callable[[Any, Any, Any], dict[str, tuple[str, Any, Any]]] | None = None

    def build(self, config: Any) -> tuple[Any, Any]:
        """(module, config) from a config instance or its dict form."""
        if isinstance(config, dict):
            config = self.config_class.from_dict(config)
        return self.module_class(config), config


def token_inputs(config: Any) -> tuple:
    """Example inputs of a model on token ids: one [1, 1] int32 token."""
    import jax.numpy as jnp

    return (jnp.zeros((1, 1), jnp.int32),)


def image_inputs(config: Any) -> tuple:
    """Example inputs of an image model: one zero image [1, H, W, C] at the config's size."""
    import jax.numpy as jnp

    h, w = config.image_hw
    return (jnp.zeros((1, h, w, config.channels), jnp.float32),)


class ReadsAsLanguageModel:
    """Mixin of a vision-language config whose decoder is its `text` field: the language-model
    attributes generation and tasks read (`vocab_size`, `max_len`, `eos_ids`, `dim`,
    `pad_token_id`) are the decoder's."""

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def max_len(self) -> int:
        return self.text.max_len

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.text.eos_ids

    @property
    def dim(self) -> int:
        return self.text.dim

    @property
    def pad_token_id(self) -> int | None:
        return self.text.pad_token_id
