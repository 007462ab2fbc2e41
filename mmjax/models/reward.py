"""Reward / value models: a LLaMA-family decoder (`mmjax.models.llama.Llama`, unchanged) with a
scalar head `score` on its final hidden states -- Hugging Face's
`LlamaForSequenceClassification` with `num_labels=1`, what trl's RewardTrainer trains and its
PPO uses as reward model and critic.

    config = RewardConfig.from_variant("tiny")             # any LLaMA variant's name
    model = RewardModel(config)
    params = model.init(rng, tokens)["params"]
    out = model.apply({"params": params}, tokens, input_mask=mask)
    out["values"]    # [B, T] float32: the head on every position (a PPO critic's V_t)
    out["rewards"]   # [B] float32: `values` at each row's last real token (a reward model's r)
    out, inter = model.apply(..., return_intermediates=True)  # + the decoder's hidden states

Pooling: `rewards[b] = values[b, last]`, `last` = the last position where `input_mask[b]` is
True (the last position T - 1 without `input_mask`; position 0 for a row without real tokens).
transformers pools at the rightmost token whose id differs from `pad_token_id` (the last
position when `pad_token_id` is None, then only batch 1). Both pick the last real token with
right padding and with left padding (with left padding that is position T - 1, and mmjax's
default positions count real tokens only, so a left-padded row scores as its unpadded self).
They differ when a real token equals the pad id -- e.g. pad = EOS and the sequence ends with
its EOS: transformers then scores the token before it, mmjax the EOS the mask marks as real.

Param tree: language_model/... (`Llama`'s: embed, layers_{i}, final_norm; no lm_head),
score/kernel [dim, 1] ("embed", None) (+ score/bias [1] with `head_bias`). The decoder's
output head is not part of the model: `RewardConfig` sets `text.tie_embeddings=True`, so the
decoder creates no `lm_head` and its (tied) logits are never returned -- under `jit` XLA drops
their computation. A reward model initialised from an SFT LLaMA takes its params without
`lm_head`. The head runs in float32 on the final-normed hidden state cast to float32, whatever
the decoder's compute dtype.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import configs
from mmjax.errors import ConfigError
from mmjax.models.family import Family, ReadsAsLanguageModel, token_inputs
from mmjax.models.llama import VARIANTS as LLAMA_VARIANTS
from mmjax.models.llama import Llama, LlamaConfig
from mmjax.nn.linear import DenseGeneral


@dataclasses.dataclass(frozen=True)
class RewardConfig(ReadsAsLanguageModel, configs.Config):
    """text: the decoder (any dense or MoE `LlamaConfig`; `tie_embeddings` is set True, see the
    module docstring). head_bias: a bias on the score head (transformers' sequence classifier
    has none; a model with one does not export). head_init_std: the head's normal init std
    (None: text.initializer_range, as transformers initialises `score`)."""

    text: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    head_bias: bool = False
    head_init_std: float | None = None

    def __post_init__(self):
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", LlamaConfig.from_dict(self.text))
        if not isinstance(self.text, LlamaConfig):
            raise ConfigError(f"RewardConfig.text must be a LlamaConfig (or its dict), got "
                              f"{type(self.text).__name__}")
        if not self.text.tie_embeddings:  # no lm_head param: a reward model has no LM output
            object.__setattr__(self, "text", self.text.replace(tie_embeddings=True))
        if not isinstance(self.head_bias, bool):
            raise ConfigError(f"RewardConfig.head_bias must be true or false, got {self.head_bias!r}")
        std = self.head_init_std
        if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float)) or std <= 0):
            raise ConfigError(f"RewardConfig.head_init_std must be a positive number or None, got {std!r}")

    @property
    def head_std(self) -> float:
        return self.text.initializer_range if self.head_init_std is None else self.head_init_std

    def num_params(self) -> int:
        return self.text.num_params() + self.text.dim + int(self.head_bias)


# every LLaMA size as a reward model of that size
VARIANTS = {name: (lambda n=name: {"text": LlamaConfig.from_variant(n)}) for name in LLAMA_VARIANTS}
RewardConfig.NAME = "reward model"
RewardConfig.VARIANTS = VARIANTS


def last_real_index(input_mask: jax.Array | None, batch: int, length: int) -> jax.Array:
    """[batch] int32: each row's last position where `input_mask` is True (0 for a row with
    none; length - 1 for every row without a mask)."""
    if input_mask is None:
        return jnp.full((batch,), length - 1, jnp.int32)
    positions = jnp.where(input_mask.astype(bool), jnp.arange(length, dtype=jnp.int32), -1)
    return jnp.maximum(jnp.max(positions, axis=-1), 0)


class RewardModel(nn.Module):
    """A LLaMA decoder with a scalar head. See the module docstring."""

    config: RewardConfig

    def setup(self):
        c = self.config
        self.language_model = Llama(c.text)
        self.score = DenseGeneral(1, ("embed", None), use_bias=c.head_bias, dtype=jnp.float32,
                                  param_dtype=jnp.dtype(c.text.param_dtype),
                                  kernel_init=nn.initializers.normal(c.head_std), name="score")

    def __call__(self, tokens: jax.Array | None = None, *, embeddings: jax.Array | None = None,
                 positions: jax.Array | None = None, input_mask: jax.Array | None = None,
                 return_intermediates: bool = False, deterministic: bool = True):
        """
        Args:
          tokens: [batch, seq] int token ids; or, instead, embeddings [batch, seq, dim] (as
            `Llama`).
          positions: [batch, seq] position ids (default: real tokens counted from 0, so left
            padding changes nothing).
          input_mask: [batch, seq] bool, False on padding (never attended, never pooled).
          return_intermediates: also return the decoder's intermediates (`hidden_states`,
            `final_hidden`).
          deterministic: False applies the decoder's dropout (pass `rngs={"dropout": key}`).
        Returns:
          {"values": [batch, seq] float32 head outputs at every position, "rewards": [batch]
          float32 `values` at each row's last real token}; then the intermediates if asked.
        """
        _, inter = self.language_model(tokens, embeddings=embeddings, positions=positions,
                                       input_mask=input_mask, return_intermediates=True,
                                       deterministic=deterministic)
        h = inter["final_hidden"]
        values = self.score(h.astype(jnp.float32))[..., 0]
        b, t = values.shape
        last = last_real_index(input_mask, b, t)
        outputs = {"values": values, "rewards": values[jnp.arange(b), last]}
        if return_intermediates:
            return outputs, inter
        return outputs


FAMILIES = (Family("reward", RewardConfig, RewardModel, token_inputs,
                   "reward / value model: a LLaMA decoder with a scalar head (LlamaForSequenceClassification)",
                   tasks=("reward",)),)

__all__ = ["RewardConfig", "RewardModel", "last_real_index", "VARIANTS", "FAMILIES"]
