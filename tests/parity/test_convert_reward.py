"""Hugging Face LlamaForSequenceClassification (num_labels=1) <-> mmjax RewardModel: parity
with the PyTorch reference, the compare runner, the round trip, strict errors.

One random-weight classifier (2 layers, hidden 32, 4 query / 2 key-value heads; every tensor
randomised, norms and the score head included) is saved with `save_pretrained` and read
through `mmjax.convert.reward` (the registry routes `model_type: llama` to the causal-LM
converter, see that module's docstring). The reference outputs come from the PyTorch model
object. Measured (CPU, fp32, -O0 XLA; tolerance 1e-4): right-padded batch, per-token scores
8.3e-7 and pooled rewards 5.1e-7 max abs diff with |rewards| up to 1.6; the compare runner
(right + left padding, seq 12): hidden states 1.8e-6, scores 1.3e-6, rewards 1.2e-7.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmjax.convert import compare as compare_lib  # noqa: E402
from mmjax.convert import hf_io, registry, reward, to_hf  # noqa: E402
from mmjax.errors import InputError, UnsupportedModelError  # noqa: E402
from mmjax.models import build_model  # noqa: E402
from mmjax.models.reward import RewardConfig  # noqa: E402

from support import randomise_torch  # noqa: E402

TOL = 1e-4
PAD = 0
HF_KW = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5, num_labels=1, pad_token_id=PAD)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**HF_KW))
    randomise_torch(hf, 0.15)
    hf.config._attn_implementation = "eager"
    path = str(tmp_path_factory.mktemp("reward"))
    hf.save_pretrained(path)
    hf_config, config, np_params = reward.read_hf_dir(path)
    module, config = build_model("reward", config)
    return hf, path, module, config, np_params


def _batch(seed=0, b=3, t=9):
    """Real tokens never equal the pad id; row 1 right-padded by 3, row 2 by 6, row 0 full."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, HF_KW["vocab_size"], size=(b, t))
    mask = np.ones((b, t), bool)
    mask[1, t - 3:] = False
    mask[2, t - 6:] = False
    tokens[~mask] = PAD
    return tokens, mask


def test_scores_and_rewards_match_transformers_with_right_padding(saved):
    hf, _, module, _, np_params = saved
    tokens, mask = _batch()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                 output_hidden_states=True)
        ref_values = hf.score(ref.hidden_states[-1])[..., 0].numpy()
    params = jax.tree_util.tree_map(jnp.asarray, np_params)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda p, t, m: module.apply({"params": p}, t, input_mask=m))(
            params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask))
    values_diff = float(np.abs(np.asarray(out["values"]) - ref_values)[mask].max())
    rewards_diff = float(np.abs(np.asarray(out["rewards"]) - ref.logits[:, 0].numpy()).max())
    assert values_diff <= TOL and rewards_diff <= TOL, (values_diff, rewards_diff)
    assert float(np.abs(ref.logits.numpy()).max()) > 0.1  # the head is not near zero


def test_compare_runner_passes_with_right_and_left_padding(saved):
    _, path, module, config, np_params = saved
    diffs, extra = reward.CONVERTER.compare(path, module, config, np_params, 3, 12, 0, torch, transformers)
    assert set(diffs) == {"hidden_states", "values", "rewards"}
    assert max(diffs.values()) <= TOL, diffs
    assert extra["inputs"]["right_padded_row"] == 2 and extra["inputs"]["left_padded_row"] == 0


def test_mmjax_compare_on_the_directory(saved):
    _, path, *_ = saved
    try:
        registry.for_hf_config(hf_io.read_config(path))
    except UnsupportedModelError as e:
        pytest.skip(f"mmjax.convert.registry picks converters by model_type only ({e})")
    report = compare_lib.compare(path, batch=2, seq_len=8)
    assert report["passed"] and report["architecture"] == "LlamaForSequenceClassification"


def test_round_trip_to_hf_is_exact(saved, tmp_path):
    hf, path, module, config, np_params = saved
    out = str(tmp_path / "export")
    to_hf(config, np_params, out)  # family "reward" from the config class
    again = transformers.LlamaForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    ours, theirs = again.state_dict(), hf.state_dict()
    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    exported = json.load(open(os.path.join(out, "config.json")))
    original = json.load(open(os.path.join(path, "config.json")))
    assert exported["architectures"] == ["LlamaForSequenceClassification"]
    assert exported["id2label"] == {"0": "LABEL_0"} and exported["pad_token_id"] == PAD
    assert again.config.num_labels == 1
    assert reward.config_from_hf(exported) == config == reward.config_from_hf(original)


def test_strict_config_and_weights(saved):
    _, path, _, config, np_params = saved
    hf_config = hf_io.read_config(path)
    two = {k: v for k, v in hf_config.items() if k not in ("id2label", "label2id")}
    with pytest.raises(UnsupportedModelError, match="2 labels.*id2label is absent"):
        reward.config_from_hf(two)
    with pytest.raises(UnsupportedModelError, match="architecture 'LlamaForCausalLM' is not supported"):
        reward.config_from_hf({**hf_config, "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(UnsupportedModelError, match="unsupported key.*'score_bias'"):
        reward.config_from_hf({**hf_config, "score_bias": True})
    with pytest.raises(UnsupportedModelError, match="problem_type 'ranking' unknown"):
        reward.config_from_hf({**hf_config, "problem_type": "ranking"})
    tensors = hf_io.read_weights(path)
    with pytest.raises(InputError, match="unexpected tensor.*lm_head.weight"):
        reward.params_from_hf({**tensors, "lm_head.weight": np.zeros((64, 32), np.float32)}, config)
    with pytest.raises(InputError, match="score.weight: shape \\(2, 32\\)"):
        reward.params_from_hf({**tensors, "score.weight": np.zeros((2, 32), np.float32)}, config)
    with pytest.raises(UnsupportedModelError, match="score head has no bias"):
        reward.config_to_hf(config.replace(head_bias=True))
    with pytest.raises(UnsupportedModelError, match="exports as model_type 'llama'"):
        reward.config_to_hf(config, "mistral")
    assert isinstance(config, RewardConfig) and config.text.num_kv_heads == 2
