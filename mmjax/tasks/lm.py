"""Causal language modelling: a LLaMA-family model on packed text, next-token cross-entropy.

    ExperimentConfig(task="lm", model=LlamaConfig(...), data=TextDataConfig(...),
                     sample=SampleConfig(prompt="The with statement"))

Batches (from `mmjax.tasks.text_data`) are dicts of [batch, seq] arrays: `inputs`, `targets`
(inputs shifted by one), `segment_ids` (packed documents; no attention across them),
`positions` (restart per document) and `loss_mask` (1 where a target counts). Evaluation scores
every validation token once: loss (nats/token), perplexity and bits per UTF-8 byte. Samples
continue `sample.prompt` with the KV-cache decoder.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from mmjax.errors import ConfigError
from mmjax.nn.moe import aux_losses
from mmjax.ops.attention import decoding_implementation
from mmjax.tasks import text_data
from mmjax.tasks.text_data import TextDataConfig
from mmjax.train.step import make_eval_step, shard_batch
from mmjax.train.task import Task

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Text sampled at an interval and at the end of training."""

    prompt: str = "The "
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = 40
    top_p: float | None = None


def lm_loss_terms(
    model: nn.Module, params: Any, batch: Batch, dropout_rng: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(sum of next-token NLL over counted targets, number of counted targets, the model's
    auxiliary losses), float32 []. The auxiliary losses are what the model sowed into its
    "losses" collection, already weighted (MoE load balance and router z-loss; {} for a dense
    model), each averaged over layers by `mmjax.nn.moe.aux_losses`.

    With `dropout_rng` the model runs in training mode (its config's dropout and router noise
    apply)."""
    c = model.config
    train = dropout_rng is not None and (getattr(c, "dropout", 0.0) > 0.0
                                         or getattr(c, "router_noise", 0.0) > 0.0)
    logits, collections = model.apply(
        {"params": params}, batch["inputs"],
        positions=batch["positions"], segment_ids=batch["segment_ids"], mutable=["losses"],
        **({"deterministic": False, "rngs": {"dropout": dropout_rng}} if train else {}),
    )  # [batch, seq, vocab] float32
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    weights = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights), aux_losses(collections)


def lm_loss_sums(
    model: nn.Module, params: Any, batch: Batch, dropout_rng: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLL over counted targets, number of counted targets), float32 [].

    With `dropout_rng` the model runs in training mode (its config's dropout applies)."""
    total, count, _ = lm_loss_terms(model, params, batch, dropout_rng)
    return total, count


def lm_loss_fn(model: nn.Module) -> Callable:
    """`loss_fn(params, batch, rng) -> (total, count, aux)` for `mmjax.train.step`. In training
    (rng given) the model's auxiliary losses join the objective as `count * aux`, so the step's
    loss is mean NLL + the auxiliary losses; `aux` reports them (evaluation leaves them out)."""

    def loss_fn(params, batch, rng):
        total, count, aux = lm_loss_terms(model, params, batch, rng)
        if rng is not None and aux:
            total = total + count * sum(aux.values())
        return total, count, aux

    return loss_fn


def lm_init_fn(model: nn.Module, seq_len: int) -> Callable[[jax.Array], Any]:
    """`init_params(rng) -> boxed params` of `model` for `mmjax.train.state`."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return lambda rng: model.init(rng, tokens)["params"]


class LanguageModelingTask(Task):
    """Next-token prediction with a decoder-only LM (any family whose record lists "lm") on a
    sentencepiece-tokenized corpus."""

    unit = "tokens"
    data_config_class = TextDataConfig
    sample_config_class = SampleConfig

    @property
    def loss_sums_over_examples(self) -> bool:
        """Token cross-entropy sums over the rows; MoE / MoD auxiliary losses are batch-level
        terms (load balance, count-weighted), so those models step on the whole batch."""
        c = self.model_config
        return not getattr(c, "num_experts", 0) and not getattr(c, "mod_capacity", None)

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        if cfg.data.seq_len > cfg.model.max_len:
            raise ConfigError(
                f"data.seq_len={cfg.data.seq_len} exceeds model.max_len={cfg.model.max_len}")

    def __init__(self, cfg: Any, workdir: str, log: Callable[[str], None] = print):
        super().__init__(cfg, workdir, log)
        self.data = text_data.build(cfg.data, workdir, log=log)
        self.model_config = cfg.model.replace(
            vocab_size=self.data.vocab_size, bos_token_id=self.data.bos_id,
            eos_token_id=self.data.eos_id, pad_token_id=self.data.pad_id,
        )
        self.model = self.build_model(self.model_config)
        decode_impl = decoding_implementation(self.model_config.implementation)
        self.decode_model = (self.model if decode_impl == self.model_config.implementation
                             else self.build_model(self.model_config.replace(implementation=decode_impl)))
        self.units_per_step = cfg.data.batch_size * cfg.data.seq_len
        self._eval_steps: dict[Any, Callable] = {}
        # rng -> boxed params (the same tree whatever the attention implementation; init
        # runs outside the mesh, where ring attention has no sequence axis)
        self.init_params = lm_init_fn(self.decode_model, cfg.data.seq_len)
        self.loss = lm_loss_fn(self.model)  # (params, batch, rng) -> (total, count, aux)

    def describe(self) -> str:
        c = self.model_config
        return (f"LLaMA dim={c.dim}, layers={c.num_layers}, heads={c.num_heads}/{c.kv_heads}, "
                f"vocab={c.vocab_size}, dtype={c.dtype}; batch {self.cfg.data.batch_size} x "
                f"{self.cfg.data.seq_len} tokens")


    def train_iterator(self):
        return self.data.train_iterator()

    def evaluate(self, params: Any, mesh: Mesh | None, *, final: bool = False) -> dict[str, float]:
        """Validation loss (nats/token), perplexity and bits per UTF-8 byte over the split
        (bits per byte only when the whole split is scored)."""
        key = id(mesh)
        if key not in self._eval_steps:
            self._eval_steps[key] = make_eval_step(self.loss, mesh=mesh)
        eval_step = self._eval_steps[key]
        max_batches = self.cfg.max_eval_batches
        total, count = 0.0, 0.0
        for i, batch in enumerate(self.data.eval_batches()):
            if max_batches is not None and i >= max_batches:
                break
            s, c, _ = eval_step(params, shard_batch(batch, mesh))
            total += float(s)
            count += float(c)
        if count == 0:
            return {}
        loss = total / count
        out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": count}
        if max_batches is None and self.data.val_bytes:
            out["val_bpb"] = total / math.log(2) / self.data.val_bytes
        return out

    def sample(self, params: Any, step: int) -> str | None:
        return sample_text(self.decode_model, params, self.data, self.cfg.sample,
                           seed=self.cfg.seed + step)


def sample_text(model, params, data: text_data.TextData, cfg: SampleConfig, seed: int = 0) -> str | None:
    """Continue `cfg.prompt` with the model (KV-cache sampling); returns prompt + continuation."""
    from mmjax.generate import GenerationConfig, generate

    prompt = [data.bos_id] + data.encode(cfg.prompt)
    n = min(cfg.max_new_tokens, model.config.max_len - len(prompt))
    if n <= 0:
        return None
    gen = GenerationConfig(max_new_tokens=n, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, eos_token_id=data.eos_id, pad_token_id=data.pad_id,
                           prompt_bucket=max(len(prompt), 1))
    out = generate(model, params, [prompt], gen, rng=jax.random.key(seed))
    new = [int(t) for t in np.asarray(out.tokens)[0][: int(np.asarray(out.lengths)[0])]]
    if data.eos_id in new:
        new = new[: new.index(data.eos_id)]
    return data.decode(prompt[1:] + new)
