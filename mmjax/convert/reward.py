"""Hugging Face `LlamaForSequenceClassification` (num_labels=1) <-> mmjax `RewardModel`
(`mmjax.models.reward`): a LLaMA decoder with a scalar `score` head, trl's reward model / PPO
critic.

Composition: this file reuses `mmjax.convert.llama` (downward, `llama` <- `reward`, as `llama`
<- `mixtral`): the decoder's config keys, defaults, RoPE handling and strictness are
`llama.config_from_hf` / `config_to_hf`, its tensors are `llama.tensor_rules` moved under
`language_model` (the HF names are the same: the classifier's base model is `model.`), and
the head is one more rule, `score.weight [1, dim]` -> `score/kernel [dim, 1]` ("linear").

Config keys beyond LLaMA's:
  * `id2label` / `label2id` / `num_labels`: must describe exactly one label (transformers
    defaults to 2 when `id2label` is absent, so such a config is refused: its head has two
    outputs). Export writes `{"0": "LABEL_0"}` as transformers does for num_labels=1.
  * `problem_type` (null, "regression", "single_label_classification",
    "multi_label_classification"): selects transformers' training loss only; accepted.
  * `tie_word_embeddings`: the classifier has no LM head, so the value changes nothing; the
    mmjax decoder is always tied (no `lm_head` param, see `RewardConfig`); export writes false.
  * `pad_token_id`: transformers pools at the rightmost non-pad token (and needs it for batch
    > 1); mmjax pools by `input_mask` (see `mmjax.models.reward`) and keeps the id as the
    decoder's `pad_token_id`.
A head with a bias (`head_bias=True`) or an MoE / sliding-window decoder does not export.

Registry: this record shares model_type "llama" with `mmjax.convert.llama`; the registry picks
it by `architectures` (LlamaForSequenceClassification), so `from_hf`, `mmjax compare`,
`mmjax convert` and `to_hf(..., model_type="llama")` reach it.

`mmjax compare` runner (`compare_reward_model`): every hidden state, the per-token head output
(transformers' `score` applied to the last hidden state, what trl's `get_reward` reads) on real
tokens, and the pooled rewards, on random tokens (never the pad id) with the last row
right-padded and, with batch >= 2, the first row left-padded.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mmjax.convert import hf_io, llama, reference
from mmjax.convert.core import (Converter, TensorRule, apply_rules_from_hf, apply_rules_to_hf,
                                build_config, check_architecture, check_model_type)
from mmjax.errors import InputError, UnsupportedModelError
from mmjax.models.reward import RewardConfig

ARCHITECTURE = "LlamaForSequenceClassification"
# classifier keys on top of LlamaConfig's (see the module docstring)
HEAD_KEYS = ("id2label", "label2id", "num_labels", "problem_type")
_PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
_DECODER = "language_model"


# --- config ---------------------------------------------------------------------------------

def num_labels_of(hf: Mapping[str, Any]) -> int:
    """The number of outputs of the HF classifier head (transformers: len(id2label), else
    num_labels, else 2)."""
    id2label = hf.get("id2label")
    if id2label is not None:
        if not isinstance(id2label, Mapping):
            raise UnsupportedModelError(f"id2label must be an object, got {id2label!r}")
        n = len(id2label)
        if "num_labels" in hf and hf["num_labels"] != n:
            raise UnsupportedModelError(f"num_labels={hf['num_labels']} disagrees with id2label "
                                        f"({n} labels)")
        return n
    n = hf.get("num_labels", 2)
    if isinstance(n, bool) or not isinstance(n, int):
        raise UnsupportedModelError(f"num_labels must be an int, got {n!r}")
    return n


def config_from_hf(hf: Mapping[str, Any]) -> RewardConfig:
    """`RewardConfig` for a parsed `LlamaForSequenceClassification` config.json (strict)."""
    check_model_type(hf, ("llama",), "reward model")
    check_architecture(hf, (ARCHITECTURE,))
    n = num_labels_of(hf)
    if n != 1:
        raise UnsupportedModelError(
            f"{ARCHITECTURE} with {n} labels: mmjax's reward model has one scalar output "
            "(num_labels=1, id2label {'0': 'LABEL_0'})" + ("; id2label is absent, and "
            "transformers then builds 2 labels" if hf.get("id2label") is None and "num_labels" not in hf else ""))
    if hf.get("problem_type") not in _PROBLEM_TYPES:
        raise UnsupportedModelError(f"problem_type {hf.get('problem_type')!r} unknown; known: "
                                    f"{', '.join(map(str, _PROBLEM_TYPES))}")
    text = llama.config_from_hf({k: v for k, v in hf.items() if k not in HEAD_KEYS})
    return build_config(RewardConfig, dict(text=text), "reward model config.json")


def config_to_hf(config: RewardConfig, model_type: str | None = None) -> dict[str, Any]:
    """The `config.json` dict of `config` as a `LlamaForSequenceClassification`."""
    if model_type not in (None, "llama"):
        raise UnsupportedModelError(f"a reward model exports as model_type 'llama' "
                                    f"({ARCHITECTURE}), not {model_type!r}")
    if config.head_bias:
        raise UnsupportedModelError(f"head_bias=True: HF {ARCHITECTURE}'s score head has no bias")
    hf = llama.config_to_hf(config.text, "llama")
    hf.update(architectures=[ARCHITECTURE], tie_word_embeddings=False,
              id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return hf


# --- weights --------------------------------------------------------------------------------

def tensor_rules(config: RewardConfig) -> list[TensorRule]:
    """Every tensor of the HF checkpoint: LLaMA's decoder rules under `language_model`, then
    the head."""
    rules = [r.under(_DECODER) for r in llama.tensor_rules(config.text)]
    if config.head_bias:
        raise UnsupportedModelError(f"head_bias=True: HF {ARCHITECTURE}'s score head has no bias")
    rules.append(TensorRule("score.weight", ("score", "kernel"), (1, config.text.dim), "linear"))
    return rules


def params_from_hf(tensors: Mapping[str, np.ndarray], config: RewardConfig) -> dict[str, Any]:
    """mmjax params (nested float32 numpy) from the HF tensors; InputError names missing,
    unexpected (e.g. an `lm_head.weight`: a causal LM is not a reward model) and wrongly
    shaped tensors."""
    return apply_rules_from_hf(tensors, tensor_rules(config), what=f"{ARCHITECTURE} checkpoint",
                               derived=llama.DERIVED_BUFFERS)


def params_to_hf(params: Mapping[str, Any], config: RewardConfig) -> dict[str, np.ndarray]:
    return apply_rules_to_hf(params, tensor_rules(config))


def read_hf_dir(path: str) -> tuple[dict[str, Any], RewardConfig, dict[str, Any]]:
    """(hf config dict, RewardConfig, numpy params) of a `LlamaForSequenceClassification`
    directory, through this converter (what `mmjax.convert.read_hf` does once the registry
    dispatches on the architecture)."""
    hf_config = hf_io.read_config(path)
    config = config_from_hf(hf_config)
    return hf_config, config, params_from_hf(hf_io.read_weights(path), config)


# --- mmjax compare --------------------------------------------------------------------------

def compare_reward_model(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers):
    """Hidden states, per-token values and pooled rewards against the transformers model."""
    import jax.numpy as jnp

    text = config.text
    if seq_len > text.max_len:
        raise InputError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {text.max_len}")
    rng = np.random.default_rng(seed)
    pad = text.pad_token_id
    tokens = rng.integers(0, text.vocab_size - (pad is not None), size=(batch, seq_len), dtype=np.int64)
    if pad is not None:
        tokens[tokens >= pad] += 1  # real tokens never equal the pad id (transformers pools by it)
    mask = np.ones((batch, seq_len), bool)
    num_pad = min(max(1, seq_len // 4), seq_len - 1) if pad is not None else 0
    if num_pad:
        mask[-1, seq_len - num_pad:] = False  # right padding on the last row
        if batch >= 2:
            mask[0, :num_pad] = False  # left padding on the first
        tokens[~mask] = pad
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)

    hf_model = reference.load_reference(transformers, torch, transformers.AutoModelForSequenceClassification,
                                        hf_dir)
    rows = [slice(0, batch)] if pad is not None else [slice(i, i + 1) for i in range(batch)]
    hidden, values, rewards = [], [], []
    with torch.no_grad():
        for row in rows:  # without a pad id transformers scores batch 1 only
            ref = hf_model(input_ids=torch.from_numpy(tokens[row]),
                           attention_mask=torch.from_numpy(mask[row].astype(np.int64)),
                           position_ids=torch.from_numpy(positions[row]), output_hidden_states=True)
            hidden.append([h.numpy() for h in ref.hidden_states])
            values.append(hf_model.score(ref.hidden_states[-1])[..., 0].numpy())
            rewards.append(ref.logits[:, 0].numpy())
    ref_hidden = [np.concatenate(hs) for hs in zip(*hidden)]
    ref_values, ref_rewards = np.concatenate(values), np.concatenate(rewards)

    out, inter = reference.run_mmjax(module, np_params, jnp.asarray(tokens, jnp.int32),
                                     input_mask=jnp.asarray(mask))
    ours = list(inter["hidden_states"][:-1]) + [inter["final_hidden"]]  # HF's last is after the norm
    layer_diffs = reference.layer_diffs(ours, ref_hidden, mask)
    diffs = {
        "hidden_states": max(layer_diffs),
        "values": reference.max_abs(out["values"], ref_values, mask),
        "rewards": reference.max_abs(out["rewards"], ref_rewards),
    }
    extra = {
        "hidden_state_diffs": layer_diffs,
        "inputs": {"batch": batch, "seq_len": seq_len, "seed": seed, "padding": num_pad,
                   "right_padded_row": batch - 1 if num_pad else None,
                   "left_padded_row": 0 if num_pad and batch >= 2 else None},
        "reference_rewards_max_abs": float(np.abs(ref_rewards).max()),
    }
    return diffs, extra


CONVERTER = Converter(
    family="reward",
    model_types=("llama",),
    architectures=(ARCHITECTURE,),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    compare=compare_reward_model,
)
