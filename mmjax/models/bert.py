"""BERT: a post-norm transformer encoder over word + position + token-type embeddings, with an
optional causal decoder mode and cross-attention (what BLIP's text decoder and BLIP-2's
Q-Former build on).

    config = BertConfig.from_variant("tiny")
    model = Bert(config)
    params = model.init(rng, tokens)["params"]                  # tokens [B, T] int
    hidden = model.apply({"params": params}, tokens, token_types, input_mask=mask)  # [B, T, dim]
    hidden, out = model.apply({"params": params}, tokens, input_mask=mask,
                              return_intermediates=True)
    # decoder with cross-attention (causal=True, cross_attention=True):
    hidden = model.apply({"params": params}, tokens, input_mask=mask,
                         encoder_hidden_states=image_feats, encoder_mask=image_mask)
    # causal decoding with a KV cache (the self-attention's keys/values; cross-attention
    # keys/values are recomputed from encoder_hidden_states, which every call passes):
    cache = model.init_cache(batch, max_len)
    hidden, cache = model.apply({"params": params}, prompt, input_mask=mask, cache=cache,
                                encoder_hidden_states=image_feats)
    hidden, cache = model.apply({"params": params}, next_tokens, cache=cache,
                                encoder_hidden_states=image_feats)

The output is the last hidden state [batch, seq, dim] (float32). `out` holds named
activations: `hidden_states` (the embedding output and every layer's output, num_layers + 1
arrays [batch, seq, dim], as Hugging Face's `hidden_states`), `last_hidden_state` and, with a
pooler, `pooler_output` = tanh(dense(last_hidden_state[:, 0])) [batch, dim]. The pooler is
optional twice over: `pooler=False` builds none, and params without a `pooler` entry (a
checkpoint saved without one) run without it.

Embeddings: word + learned absolute position (positions 0..T-1) + token-type rows
(`token_types` [batch, seq] in [0, type_vocab_size), default all 0), then a LayerNorm. Layers:
the shared stack (`mmjax.nn.transformer`, `bert_block_spec`): post-norm LayerNorm blocks,
x = LN(x + Attn(x)); [x = LN(x + XAttn(x, ctx))]; x = LN(x + MLP(x)), biases everywhere, no
RoPE. `input_mask` [batch, seq] (True = real token) masks padded keys; `causal=True` adds the
causal mask (HF `is_decoder`). With `cross_attention=True` every layer has a cross-attention
sub-block reading `encoder_hidden_states` [batch, ctx, encoder_width] (keys/values projected
from `encoder_width`, default `dim`), masked by `encoder_mask` [batch, ctx]; called without
encoder states, the cross-attention sub-blocks are skipped (as transformers' `BertModel` does,
and as BLIP's text encoder runs in its unimodal mode).

KV cache (`causal=True` only): `init_cache` gives a `mmjax.nn.cache.KVCache`; with `cache=` the
new tokens are appended and attend every cached real token (left-padded prompts: padding is
never attended) and their positions count the row's real tokens (position 0 = the first real
token, as transformers numbers an unpadded prompt). The call then returns `(hidden, cache)`.

Bad input raises `mmjax.errors.InputError` naming the value and the limit: a sequence longer
than `max_len`, token ids outside [0, vocab_size) and token types outside
[0, type_vocab_size) (the last two checked when the values are concrete, i.e. outside jit).

Param tree: embeddings/{word/embedding [vocab, dim], position/embedding [max_len, dim],
token_type/embedding [type_vocab_size, dim], norm}, layers_{i}/{attn/{query,key,value,out},
attn_norm, [cross_attn/..., cross_norm,] mlp/{fc1,fc2}, mlp_norm} (or layers/block/... when
`scan_layers`), pooler/{kernel, bias} (with `pooler`). Every param carries logical axis names
(the small token-type table is a "position"-like replicated table).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import configs
from mmjax.errors import ConfigError, InputError
from mmjax.models.family import Family
from mmjax.nn.cache import KVCache
from mmjax.nn.embeddings import Embed, LearnedPositions
from mmjax.nn.linear import DenseGeneral
from mmjax.nn.mlp import ACTIVATIONS
from mmjax.nn.norms import LayerNorm
from mmjax.nn.partitioning import BATCH_LEN_EMBED, constrain
from mmjax.nn.transformer import BlockSpec, check_remat_policy, make_layers, run_layers
from mmjax.ops import masks as masks_lib


@dataclasses.dataclass(frozen=True)
class BertConfig(configs.Config):
    vocab_size: int = 30522
    dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_len: int = 512  # learned absolute positions (HF max_position_embeddings)
    type_vocab_size: int = 2  # token-type (segment) rows; 0 = no token-type embedding
    activation: str = "gelu"  # exact GELU in BERT
    norm_eps: float = 1e-12
    pooler: bool = True  # tanh(dense([CLS])) (HF BertPooler)
    causal: bool = False  # causal self-attention (HF is_decoder)
    cross_attention: bool = False  # a cross-attention sub-block in every layer (HF add_cross_attention)
    encoder_width: int | None = None  # width of encoder_hidden_states; None = dim
    pad_token_id: int | None = 0
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    implementation: str | None = None  # ops.attention implementation (None = best for platform)
    remat: bool = False
    remat_policy: str = "full"
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "mlp_dim", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"BertConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ConfigError(f"BertConfig.type_vocab_size must be an int >= 0, got {self.type_vocab_size!r}")
        if self.dim % self.num_heads:
            raise ConfigError(f"BertConfig: dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"BertConfig.activation {self.activation!r}"
                              f"{configs.closest_name(str(self.activation), ACTIVATIONS)}; "
                              f"known: {', '.join(ACTIVATIONS)}")
        if not self.norm_eps > 0:
            raise ConfigError(f"BertConfig.norm_eps must be positive, got {self.norm_eps!r}")
        if self.encoder_width is not None:
            if not self.cross_attention:
                raise ConfigError("BertConfig.encoder_width is the width of the cross-attention input; "
                                  "set cross_attention=True or leave encoder_width=None")
            if self.encoder_width <= 0:
                raise ConfigError(f"BertConfig.encoder_width must be positive or None, got {self.encoder_width}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"BertConfig.pad_token_id {self.pad_token_id} is outside the vocabulary "
                              f"[0, {self.vocab_size}); set it inside or to None")
        self.check_dtypes("dtype", "param_dtype")
        check_remat_policy("BertConfig", self.remat_policy)

    @property
    def head_size(self) -> int:
        """Per-head width (dim // num_heads)."""
        return self.dim // self.num_heads

    @property
    def cross_width(self) -> int:
        """Width of `encoder_hidden_states` (cross-attention keys/values input)."""
        return self.encoder_width or self.dim

    def num_params(self) -> int:
        d, m = self.dim, self.mlp_dim
        n = (self.vocab_size + self.max_len + self.type_vocab_size) * d + 2 * d
        attn = 4 * d * d + 4 * d + 2 * d  # q/k/v/out with biases + post-attention norm
        layer = attn + 2 * d * m + m + d + 2 * d
        if self.cross_attention:
            e = self.cross_width
            layer += 2 * d * d + 2 * e * d + 4 * d + 2 * d
        n += self.num_layers * layer
        if self.pooler:
            n += d * d + d
        return n


BertConfig.NAME = "BERT"
BertConfig.VARIANTS = {
    "tiny": dict(vocab_size=128, dim=64, num_layers=2, num_heads=4, mlp_dim=128, max_len=32,
                 type_vocab_size=3),
    "tiny-decoder": dict(vocab_size=128, dim=64, num_layers=2, num_heads=4, mlp_dim=128, max_len=32,
                         type_vocab_size=3, causal=True, cross_attention=True, encoder_width=48),
    "base": dict(),  # bert-base: 768 wide, 12 layers, 12 heads
    "large": dict(dim=1024, num_layers=24, num_heads=16, mlp_dim=4096),
    "MiniLM-L6-H384": dict(dim=384, num_layers=6, num_heads=12, mlp_dim=1536),
}


def bert_block_spec(c: BertConfig, cross_attention: bool | None = None) -> BlockSpec:
    """The block every BERT layer is: post-norm LayerNorm, biased attention and plain MLP,
    cross-attention when `cross_attention` (default: the config's)."""
    return BlockSpec(
        num_heads=c.num_heads, mlp_dim=c.mlp_dim, head_dim=c.head_size, norm="layer", norm_eps=c.norm_eps,
        norm_position="post", mlp="plain", activation=c.activation, qkv_bias=True, out_bias=True,
        mlp_bias=True, cross_attention=c.cross_attention if cross_attention is None else cross_attention,
        initializer_range=c.initializer_range, implementation=c.implementation, dtype=c.dtype,
        param_dtype=c.param_dtype)


def _check_ids(ids: Any, limit: int, what: str) -> None:
    """InputError for concrete ids outside [0, limit) (skipped under jit)."""
    if isinstance(ids, jax.core.Tracer):
        return
    values = np.asarray(ids)
    if values.size == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= limit:
        bad = hi if hi >= limit else lo
        raise InputError(f"BERT: {what} {bad} is outside [0, {limit})")


def check_inputs(config: BertConfig, tokens: Any, token_types: Any = None, input_mask: Any = None,
                 encoder_hidden_states: Any = None, encoder_mask: Any = None) -> None:
    """InputError for inputs the model cannot take (module docstring)."""
    c = config
    shape = tuple(getattr(tokens, "shape", ()))
    if len(shape) != 2:
        raise InputError(f"BERT: tokens must be [batch, seq], got shape {shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise InputError(f"BERT: tokens must be integer ids, got dtype {tokens.dtype}")
    if shape[1] > c.max_len:
        raise InputError(f"BERT: sequence length {shape[1]} exceeds max_position_embeddings "
                         f"(max_len) {c.max_len}; truncate the input")
    _check_ids(tokens, c.vocab_size, "token id")
    if token_types is not None:
        if tuple(token_types.shape) != shape:
            raise InputError(f"BERT: token_types must have the tokens' shape {shape}, got "
                             f"{tuple(token_types.shape)}")
        if not jnp.issubdtype(token_types.dtype, jnp.integer):
            raise InputError(f"BERT: token_types must be integer ids, got dtype {token_types.dtype}")
        if c.type_vocab_size == 0:
            raise InputError("BERT: this model has no token-type embedding (type_vocab_size=0); "
                             "call it without token_types")
        _check_ids(token_types, c.type_vocab_size, "token type id")
    if input_mask is not None and tuple(input_mask.shape) != shape:
        raise InputError(f"BERT: input_mask must have shape {shape}, got {tuple(input_mask.shape)}")
    if encoder_hidden_states is not None:
        if not c.cross_attention:
            raise InputError("BERT: encoder_hidden_states given, but the model has no cross-attention "
                             "(cross_attention=False)")
        es = tuple(encoder_hidden_states.shape)
        if len(es) != 3 or es[0] != shape[0] or es[2] != c.cross_width:
            raise InputError(f"BERT: encoder_hidden_states must be [batch={shape[0]}, ctx, "
                             f"encoder_width={c.cross_width}], got shape {es}")
        if encoder_mask is not None and tuple(encoder_mask.shape) != es[:2]:
            raise InputError(f"BERT: encoder_mask must have shape {es[:2]}, got {tuple(encoder_mask.shape)}")
    elif encoder_mask is not None:
        raise InputError("BERT: encoder_mask given without encoder_hidden_states")


class BertEmbeddings(nn.Module):
    """LN(word[tokens] + position[positions] + token_type[token_types]) [batch, seq, dim];
    positions default to 0..T-1."""

    config: BertConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, token_types: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        init = nn.initializers.normal(c.initializer_range)
        t = tokens.shape[1]
        x = Embed(c.vocab_size, c.dim, dtype, pdtype, init, name="word")(tokens)
        if c.type_vocab_size:
            types = jnp.zeros_like(tokens) if token_types is None else token_types
            x = x + LearnedPositions(c.type_vocab_size, c.dim, dtype, pdtype, init, name="token_type")(types)
        table = LearnedPositions(c.max_len, c.dim, dtype, pdtype, init, name="position")
        x = x + (table(jnp.arange(t))[None] if positions is None else table(positions))
        return LayerNorm(c.norm_eps, dtype=dtype, param_dtype=pdtype, name="norm")(x)


class Bert(nn.Module):
    """BERT encoder / decoder; see the module docstring for the call forms."""

    config: BertConfig

    def init_cache(self, batch: int, max_len: int | None = None, dtype: Any = None) -> KVCache:
        """An empty self-attention KV cache for `batch` rows of up to `max_len` tokens (default
        config.max_len); stacked over layers for a scanned stack. Needs `causal=True`."""
        c = self.config
        if not c.causal:
            raise ConfigError("BERT: a KV cache needs a causal decoder (causal=True); a bidirectional "
                              "encoder re-reads the whole sequence")
        return KVCache.create(c.num_layers, batch, max_len or c.max_len, c.num_heads, c.head_size,
                              jnp.dtype(dtype or c.dtype), stacked=c.scan_layers)

    @nn.compact
    def __call__(self, tokens: jax.Array, token_types: jax.Array | None = None,
                 input_mask: jax.Array | None = None, encoder_hidden_states: jax.Array | None = None,
                 encoder_mask: jax.Array | None = None, *, cache: KVCache | None = None,
                 deterministic: bool = True, return_intermediates: bool = False):
        """
        Args:
          tokens: [batch, seq] int token ids.
          token_types: [batch, seq] int in [0, type_vocab_size) (default all 0).
          input_mask: [batch, seq] bool, True for real tokens (default: all real).
          encoder_hidden_states: [batch, ctx, encoder_width] for the cross-attention sub-blocks
            (None skips them).
          encoder_mask: [batch, ctx] bool, True for real context positions.
          cache: a KVCache from `init_cache` (causal decoders): the tokens are appended to it.
          return_intermediates: also return the dict of named activations.
        Returns:
          the last hidden state [batch, seq, dim] float32; then the new cache if `cache` was
          given; then the intermediates dict if asked.
        """
        c = self.config
        check_inputs(c, tokens, token_types, input_mask, encoder_hidden_states, encoder_mask)
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        positions = cache_index = None
        causal = c.causal
        if cache is not None:
            if not c.causal:
                raise InputError("BERT: cache= needs a causal decoder (causal=True)")
            if input_mask is None:
                input_mask = jnp.ones(tokens.shape, bool)
            cache_index = cache.index
            cache, positions, mask = cache.advance(input_mask)  # mask: causal over the cache slots
            causal = False
        else:
            mask = None if input_mask is None else masks_lib.padding_mask(input_mask)
        x = BertEmbeddings(c, name="embeddings")(tokens, token_types, positions)
        x = constrain(x, BATCH_LEN_EMBED)
        cross = encoder_hidden_states is not None
        cross_mask = None
        if cross:
            encoder_hidden_states = encoder_hidden_states.astype(dtype)
            if encoder_mask is not None:
                cross_mask = masks_lib.padding_mask(encoder_mask)
        layers = make_layers(bert_block_spec(c, cross_attention=cross), c.num_layers, scan=c.scan_layers,
                             remat=c.remat_policy if c.remat else "none")
        embedded = x
        x, hidden, new_kv = run_layers(
            layers, x, mask=mask, cross_input=encoder_hidden_states, cross_mask=cross_mask,
            cache_kv=None if cache is None else (cache.k, cache.v), cache_index=cache_index,
            causal=causal, deterministic=deterministic, keep_hidden=return_intermediates)
        last = x.astype(jnp.float32)
        out = {"hidden_states": (embedded,) + hidden, "last_hidden_state": last}
        # params converted from a checkpoint without a pooler (HF add_pooling_layer=False) have
        # none: the model then returns no pooler_output
        if c.pooler and (self.is_initializing() or self.has_variable("params", "pooler")):
            pooled = DenseGeneral(c.dim, ("embed", "mlp"), use_bias=True, dtype=dtype, param_dtype=pdtype,
                                  kernel_init=nn.initializers.normal(c.initializer_range),
                                  name="pooler")(x[:, 0])
            out["pooler_output"] = jnp.tanh(pooled).astype(jnp.float32)
        outputs: tuple = (last,)
        if cache is not None:
            outputs += (cache.replace(k=new_kv[0], v=new_kv[1]),)
        if return_intermediates:
            outputs += (out,)
        return outputs[0] if len(outputs) == 1 else outputs


def bert_inputs(config: BertConfig) -> tuple:
    """Example inputs (positional: tokens, token_types, input_mask, encoder_hidden_states)
    creating every param: one token and, with cross-attention, one context position."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    token_types = jnp.zeros((1, 1), jnp.int32) if config.type_vocab_size else None
    if config.cross_attention:
        return tokens, token_types, None, jnp.zeros((1, 1, config.cross_width), jnp.float32)
    return tokens, token_types


FAMILIES = (Family("bert", BertConfig, Bert, bert_inputs,
                   "BERT encoder (post-norm; optional causal decoder with cross-attention)"),)
