"""Presets reach nested model configs: the `flamingo` preset (bf16 compute, fp32 params,
tensor-parallel attention/MLP, ZeRO-1 moments) on a two-tower model (CLIP: a ViT image tower and
a text tower), one train step on data=2,tensor=4 against the same step on one device.

Tolerances. Layout (float32 under the flamingo rules): only summation order changes, measured
max param diff 3e-7; we assert rtol 1e-4 / atol 1e-5 as the other presets' tests. bf16 compute:
bf16 keeps 8 mantissa bits (2^-9 ~ 2e-3 relative rounding per operation) and the sharded step
rounds partial sums at other points; measured on this 1-layer-per-tower model: loss 7.6e-4
relative, and the Adam update of a few near-zero-gradient entries (biases, [CLS], positions)
flips: 0.005% of entries move by more than 3e-3, max 6.2e-3, mean 3.9e-5 at lr 1e-2. We
assert loss rel 3e-3 (one bf16 rounding step), mean |diff| < 5e-4 (5% of one step) and at most
0.1% of entries beyond 3e-3: a wrong layout or a missing all-reduce moves most params by a whole
step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import ConfigError
from mmjax.models import build_model
from mmjax.models.clip import CLIPConfig
from mmjax.ops.losses import clip_loss
from mmjax.parallel import get_preset, make_mesh
from mmjax.train.experiment import OptimizerConfig
from mmjax.train.optimizer import make_optimizer
from mmjax.train.state import abstract_boxed_params, create_train_state
from mmjax.train.step import make_train_step, shard_batch

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

_T = CLIPConfig.from_variant("tiny")  # towers: dim 64, 4 heads
TINY = _T.replace(vision=_T.vision.replace(num_layers=1), text=_T.text.replace(num_layers=1))


def _batch(b=8, seed=0):
    rng = np.random.default_rng(seed)
    h, w = TINY.vision.image_hw
    tokens = rng.integers(1, 98, (b, 8)).astype(np.int32)
    tokens[:, -1] = TINY.text.eos_token_id
    return {"images": rng.normal(size=(b, h, w, 3)).astype(np.float32), "tokens": tokens,
            "input_mask": np.ones((b, 8), bool)}


def _step(cfg, preset=None):
    model, _ = build_model("clip", cfg)
    example = _batch(1)

    def init(rng):
        return model.init(rng, example["images"], example["tokens"])["params"]

    def loss_fn(params, batch, rng):
        out = model.apply({"params": params}, batch["images"], batch["tokens"],
                          input_mask=batch["input_mask"])
        return clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"]), jnp.float32(1.0), {}

    tx, sched = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, eps=1e-3), 10,
                               abstract_boxed_params(init))
    if preset is None:
        state, _ = create_train_state(init, tx, seed=0)
        state, m = make_train_step(loss_fn, tx, sched)(state, shard_batch(_batch(), None))
        return float(m["loss"]), state
    p = get_preset(preset)
    mesh = make_mesh(p.example_mesh)
    state, sh = create_train_state(init, tx, seed=0, mesh=mesh, rules=p.rules, opt_rules=p.opt_rules)
    step = make_train_step(loss_fn, tx, sched, mesh=mesh, shardings=sh, rules=p.rules)
    state, m = step(state, shard_batch(_batch(), mesh, p.rules))
    return float(m["loss"]), state


def test_presets_configure_every_tower():
    cfg = get_preset("flamingo").configure_model(TINY)
    for tower in (cfg.vision, cfg.text):
        assert (tower.dtype, tower.param_dtype) == ("bfloat16", "float32")
    ring = get_preset("context").configure_model(TINY)
    assert ring.vision.implementation == ring.text.implementation == "ring"
    assert get_preset("context").configure_model(TINY, on_mesh=False) is TINY
    assert get_preset("fsdp").configure_model(TINY) is TINY


def test_a_preset_setting_no_config_has_is_refused():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class NoDtype:
        width: int = 3

    with pytest.raises(ConfigError, match="dtype, param_dtype.*NoDtype"):
        get_preset("flamingo").configure_model(NoDtype())


def _flat(state):
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(state.params)])


def test_flamingo_layout_on_two_towers_equals_one_device_in_float32():
    ref_loss, ref = _step(TINY)
    loss, state = _step(TINY, "flamingo")
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(ref.params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
    for tower in ("vision", "text"):
        q = state.params[tower]["layers_0"]["attn"]["query"]["kernel"]  # [embed, heads, hd]
        assert tuple(q.sharding.spec)[:2] == (None, "tensor"), tower
        mu = state.opt_state[1][0].mu[tower]["layers_0"]["attn"]["query"]["kernel"]
        assert tuple(mu.sharding.spec)[:2] == ("data", "tensor"), tower


def test_flamingo_preset_trains_a_two_tower_model_like_one_device():
    cfg = get_preset("flamingo").configure_model(TINY)
    ref_loss, ref = _step(cfg)
    loss, state = _step(cfg, "flamingo")
    assert loss == pytest.approx(ref_loss, rel=3e-3)
    diff = np.abs(_flat(state) - _flat(ref))
    assert diff.mean() < 5e-4 and (diff > 3e-3).mean() < 1e-3, (diff.mean(), (diff > 3e-3).mean())
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(state.params))
