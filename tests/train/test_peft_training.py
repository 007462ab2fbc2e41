"""PEFT through the training stack (`mmjax.train.peft`): a LoRA run of a pretrained tiny LM
starts exactly at the base model, trains only the LoRA leaves (the base is bit-identical after
training, the optimizer holds moments only for LoRA), and its workdir loads as the merged plain
model; bfloat16 / int8 frozen bases store the base compactly and start near the base model."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from mmjax import checkpoint
from mmjax.errors import ConfigError, InputError
from mmjax.nn import lora as L
from mmjax.nn import quant
from mmjax.train.experiment import load_experiment
from mmjax.train.loop import train
from mmjax.train.optimizer import make_optimizer, path_str

from support import LLM_TEXT, tiny_overrides

TARGETS = (r"attn/(query|key|value|out)$", r"mlp/(gate|up|down)$")


def flat(tree):
    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    """A tiny LM pretrained for 6 steps (its workdir, final metrics, params)."""
    workdir = str(tmp_path_factory.mktemp("peft") / "base")
    cfg = load_experiment(LLM_TEXT, tiny_overrides(corpus, steps=6))
    out = train(cfg, workdir)
    return workdir, out, cfg, flat(checkpoint.load_workdir(workdir)[2])


def lora_cfg(base, **kw):
    workdir, _, cfg, _ = base
    peft = L.LoraConfig(targets=TARGETS, r=4, alpha=8.0)
    import dataclasses

    opt = dataclasses.replace(cfg.optimizer, learning_rate=1e-2, warmup_steps=1)
    return cfg.replace(init_from=workdir, peft=peft, steps=6, optimizer=opt, **kw)


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    """A LoRA run (r=4 on the 7 projections) from the base: (workdir, its config, metrics)."""
    wd = str(tmp_path_factory.mktemp("peft") / "lora")
    cfg = lora_cfg(base)
    return wd, cfg, train(cfg, wd)


def test_lora_run_starts_at_the_base_trains_only_lora_and_loads_merged(base, lora_run):
    _, base_out, _, base_params = base
    wd, cfg, out = lora_run
    # B = 0 at init: the first evaluation is the base model's, exactly
    assert out["start_val_loss"] == pytest.approx(base_out["val_loss"], abs=1e-6)
    assert out["val_loss"] < out["start_val_loss"] - 1e-3  # and LoRA learned something
    _, _, raw = checkpoint.load_workdir(wd, fold=False)
    raw = flat(raw)
    lora_paths = [p for p in raw if p.endswith(("/lora_a", "/lora_b"))]
    assert len(lora_paths) == 2 * 7 * 2  # 7 targets x 2 layers, A and B
    assert any(np.abs(raw[p]).max() > 0 for p in lora_paths if p.endswith("lora_b"))
    for p, v in base_params.items():  # the frozen base is bit-identical after training
        np.testing.assert_array_equal(raw[p], v, err_msg=p)
    # the workdir loads as the plain model with LoRA merged: kernel + scale * A.B
    _, _, merged = checkpoint.load_workdir(wd)
    merged = flat(merged)
    assert set(merged) == set(base_params)
    k = "layers_0/attn/query/kernel"
    a, b = raw["layers_0/attn/query/lora_a"], raw["layers_0/attn/query/lora_b"]
    want = base_params[k] + cfg.peft.scale * np.einsum("er,rhd->ehd", a, b)
    np.testing.assert_allclose(merged[k], want, rtol=1e-5, atol=1e-6)


def test_the_optimizer_holds_moments_only_for_lora(base):
    from mmjax.models import build_model

    _, _, cfg, _ = base
    module, _ = build_model("llama", cfg.model.replace(vocab_size=512))
    tokens = jnp.zeros((1, 4), jnp.int32)
    with L.lora(L.LoraConfig(targets=TARGETS, r=4)):
        params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens)["params"])
    tx, _ = make_optimizer(cfg.optimizer, 10, params, trainable=(r"(^|/)lora_[ab]$",))
    state = jax.eval_shape(tx.init, __import__("flax").linen.meta.unbox(params))
    sized = [x for x in jax.tree_util.tree_leaves(state) if getattr(x, "ndim", 0) >= 2]
    n_lora = sum(1 for p in L.lora_modules(__import__("flax").linen.meta.unbox(params))) * 2
    assert n_lora == 2 * 7 * 2
    assert len(sized) == 2 * n_lora  # Adam mu and nu of each LoRA leaf, nothing for the base


def test_bfloat16_storage_keeps_norms_and_trainable_params_float32():
    """frozen_base_dtype='bfloat16' on a boxed init tree (no training run: the int8 run below
    covers the loop; this is the cast's rule): frozen 2+-D params bf16, 1-D and LoRA float32."""
    from mmjax.train.peft import PeftRun

    run = PeftRun(L.LoraConfig(targets=TARGETS), "bfloat16")
    tree = {"embed": {"embedding": jnp.ones((8, 4))}, "final_norm": {"scale": jnp.ones(4)},
            "layers_0": {"attn": {"query": {"kernel": jnp.ones((4, 2, 2)),
                                            "lora_a": jnp.ones((4, 2))}}}}
    out = flat(run.store_frozen(tree, None))
    assert out["embed/embedding"].dtype == jnp.bfloat16
    assert out["layers_0/attn/query/kernel"].dtype == jnp.bfloat16
    assert out["final_norm/scale"].dtype == np.float32
    assert out["layers_0/attn/query/lora_a"].dtype == np.float32


@pytest.mark.parametrize("dtype,tol", [("int8", 0.02)])
def test_compact_frozen_base(base, tmp_path, dtype, tol):
    _, base_out, _, base_params = base
    cfg = lora_cfg(base, frozen_base_dtype=dtype)
    out = train(cfg, str(tmp_path / dtype))
    # the stored base is a rounding of the base model: the first evaluation is close to it
    assert out["start_val_loss"] == pytest.approx(base_out["val_loss"], rel=tol)
    assert out["val_loss"] < out["start_val_loss"]
    raw = flat(checkpoint.load_workdir(str(tmp_path / dtype), fold=False)[2])
    k = "layers_1/mlp/up/kernel"
    if dtype == "int8":
        assert raw[k].dtype == np.int8 and raw[k.replace("kernel", quant.SCALE)].dtype == np.float32
        deq = raw[k].astype(np.float32) * raw[k.replace("kernel", quant.SCALE)][None, :]
        step = np.abs(base_params[k]).max(axis=0) / 127.0
        assert np.all(np.abs(deq - base_params[k]) <= step / 2 + 1e-7)  # half a step at most
        assert raw["embed/embedding"].dtype == jnp.bfloat16  # a frozen non-Dense param
    else:
        assert raw[k].dtype == jnp.bfloat16
    assert raw["layers_1/mlp/up/lora_a"].dtype == np.float32  # LoRA trains in float32
    assert raw["final_norm/scale"].dtype == np.float32  # 1-D frozen params stay float32
    merged = flat(checkpoint.load_workdir(str(tmp_path / dtype))[2])
    assert set(merged) == set(base_params) and merged[k].dtype == np.float32


def test_bad_peft_configs(base, tmp_path):
    with pytest.raises(InputError, match=r"LoRA target 'q_proj' matches no DenseGeneral.*closest"):
        train(lora_cfg(base).replace(peft=L.LoraConfig(targets=("q_proj",))), str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="frozen_base_dtype='int4'"):
        lora_cfg(base, frozen_base_dtype="int4")
    with pytest.raises(ConfigError, match="nothing is frozen"):
        lora_cfg(base).replace(peft=None, frozen_base_dtype="bfloat16")
    with pytest.raises(ConfigError, match="not a PEFT method config"):
        lora_cfg(base).replace(peft=8)
    with pytest.raises(ConfigError, match="missing 1 required positional argument: 'targets'"):
        lora_cfg(base).replace(peft={"r": 8})
    with pytest.raises(ConfigError, match="unknown lora key"):
        lora_cfg(base).replace(peft={"targets": ["query$"], "rank": 8})


def test_llama_adapter_and_prompt_tuning_through_the_stack(base, tmp_path):
    from mmjax.nn import peft_methods as P

    _, base_out, _, base_params = base
    cfg = lora_cfg(base).replace(peft={"method": "llama_adapter", "adapter_len": 4,
                                       "adapter_layers": 1})
    assert isinstance(cfg.peft, P.LlamaAdapterConfig)
    out = train(cfg, str(tmp_path / "adapter"))
    # the zero-initialised gate: the first evaluation is the base model's
    assert out["start_val_loss"] == pytest.approx(base_out["val_loss"], abs=1e-6)
    assert out["val_loss"] < out["start_val_loss"]
    raw = flat(checkpoint.load_workdir(str(tmp_path / "adapter"), fold=False)[2])
    assert np.abs(raw["layers_1/attn/adaption_gate"]).max() > 0  # the gate trained
    assert "layers_0/attn/adaption_gate" not in raw  # only the top layer
    for p, v in base_params.items():
        np.testing.assert_array_equal(raw[p], v, err_msg=p)
    with pytest.raises(InputError, match="cannot be folded"):
        checkpoint.load_workdir(str(tmp_path / "adapter"))
    # prompt tuning refuses packed rows (the lm task's segment ids) with a clear error
    with pytest.raises(InputError, match="segment_ids is not supported"):
        train(lora_cfg(base).replace(peft={"method": "prompt_tuning", "num_virtual_tokens": 4,
                                           "init": "sampled_vocab"}), str(tmp_path / "prompt"))


def test_a_trained_lora_exports_to_peft(base, lora_run, tmp_path):
    """`mmjax export WORKDIR OUT --adapter`: the trained LoRA as a peft directory; PeftModel on
    the exported base model gives the mmjax merged model's logits."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from mmjax import cli

    base_wd, wd = base[0], lora_run[0]
    assert cli.main(["export", base_wd, str(tmp_path / "hf_base")]) == 0
    assert cli.main(["export", wd, str(tmp_path / "adapter"), "--adapter"]) == 0
    assert cli.main(["export", base_wd, str(tmp_path / "x"), "--adapter"]) == 2  # not a LoRA run
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_base"))
    model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    tokens = np.random.default_rng(0).integers(0, 512, (2, 12))
    with torch.no_grad():
        want = model(torch.as_tensor(tokens)).logits.numpy()
    module, _, merged = checkpoint.load_workdir(wd)
    got = np.asarray(module.apply({"params": merged}, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - np.asarray(module.apply({"params": checkpoint.load_workdir(base_wd)[2]},
                                                jnp.asarray(tokens, jnp.int32)))).max() > 1e-4
