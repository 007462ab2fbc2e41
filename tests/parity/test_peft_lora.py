"""LoRA (`mmjax.nn.lora`) and peft interop (`mmjax.convert.peft`, `mmjax compare --adapter`).

A tiny random `LlamaForCausalLM` (every tensor randomised, norms included) gets a peft LoRA
adapter on q/k/v/o and gate/up/down whose A and B are both randomised (B nonzero, so a
transposed, mis-reshaped or mis-scaled LoRA path shows), saved with `save_pretrained`. The
reference logits come from `PeftModel` itself.
"""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.numpy import load_file, save_file  # noqa: E402
from support import randomise_torch  # noqa: E402

from mmjax import cli  # noqa: E402
from mmjax.convert import from_hf, read_hf  # noqa: E402
from mmjax.convert import peft as peft_io  # noqa: E402
from mmjax.errors import ConfigError, InputError, UnsupportedModelError  # noqa: E402
from mmjax.nn import lora as L  # noqa: E402

TOL = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
MMJAX_TARGETS = (r"attn/(query|key|value|out)$", r"mlp/(gate|up|down)$")


def _randomise_lora(model, scale=0.2):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn_like(p))


def _peft_model(base, **lora_kw):
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS,
                             "lora_dropout": 0.1, **lora_kw})
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    _randomise_lora(model)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(hf base model, base dir, {name: (peft model, adapter dir)})."""
    torch.manual_seed(0)
    base = randomise_torch(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)), 0.08)
    base.config._attn_implementation = "eager"
    base_dir = str(tmp_path_factory.mktemp("base"))
    base.save_pretrained(base_dir)
    adapters = {}
    for name, kw in {"lora": {}, "rslora": {"use_rslora": True, "r": 8, "lora_alpha": 4}}.items():
        model = _peft_model(base, **kw)
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        adapters[name] = (model, path)
    return base, base_dir, adapters


def _tokens(seed=0, batch=2, seq=11):
    return np.random.default_rng(seed).integers(3, LLAMA["vocab_size"], size=(batch, seq))


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens)).logits.numpy()


def _mmjax_logits(module, params, tokens, cfg=None):
    def run():
        with jax.default_matmul_precision("highest"):
            apply = jax.jit(lambda p, t: module.apply({"params": p}, t))
            return np.asarray(apply(params, jnp.asarray(tokens, jnp.int32)))
    if cfg is None:
        return run()
    with L.lora(cfg):
        return run()


@pytest.mark.parametrize("name", ["lora", "rslora"])
def test_compare_adapter_cli(saved, name, capsys):
    _, base_dir, adapters = saved
    path = adapters[name][1]
    assert cli.main(["compare", base_dir, "--adapter", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["passed"] is True and report["model_type"] == "llama"
    assert report["max_abs_diff"] < TOL and report["tolerance"] == TOL
    assert report["adapter"]["path"] == path and report["adapter"]["num_modules"] == 7 * 2
    assert "peft" in report["reference"]
    if name == "rslora":
        assert report["adapter"]["use_rslora"] and report["adapter"]["scale"] == pytest.approx(4 / 8 ** 0.5)


OPT = dict(vocab_size=96, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=40, pad_token_id=1, bos_token_id=2, eos_token_id=2,
           word_embed_proj_dim=32, activation_function="relu")
OPT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "project_in", "project_out"]


def test_opt_adapter_both_ways(tmp_path, capsys):
    """Another family through the same code: OPT (its own module names, biases in the base,
    project_in/out between a 32-wide embedding and the 64-wide decoder)."""
    torch.manual_seed(1)
    base = randomise_torch(transformers.OPTForCausalLM(transformers.OPTConfig(**OPT)), 0.1)
    base.config._attn_implementation = "eager"
    base_dir, path = str(tmp_path / "opt"), str(tmp_path / "opt_lora")
    base.save_pretrained(base_dir)
    model = _peft_model(base, target_modules=OPT_TARGETS, r=2, lora_alpha=6)
    model.save_pretrained(path)
    assert cli.main(["compare", base_dir, "--adapter", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model_type"] == "opt" and report["max_abs_diff"] < TOL
    assert report["adapter"]["num_modules"] == 6 * 2 + 2
    _, params = from_hf(base_dir)
    config = read_hf(base_dir)[2]
    full, adapter = peft_io.load_adapter(path, params, config, "opt")
    assert full["project_in"]["lora_a"].shape == (32, 2)
    out = str(tmp_path / "opt_exported")
    peft_io.export_adapter(full, adapter.config, config, out)
    ours, theirs = (load_file(os.path.join(d, peft_io.WEIGHTS_FILE)) for d in (out, path))
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    tokens = _tokens(6, seq=9) % OPT["vocab_size"]
    np.testing.assert_allclose(_torch_logits(reloaded, tokens), _torch_logits(model, tokens), atol=1e-6)


def test_adapter_changes_the_model(saved):
    """The adapter is far from a no-op (so the parity above tests the LoRA path), and the
    mmjax LoRA logits match PeftModel's; its merged form matches too."""
    base, base_dir, adapters = saved
    model, path = adapters["lora"]
    module, params = from_hf(base_dir)
    config = read_hf(base_dir)[2]
    full, adapter = peft_io.load_adapter(path, params, config, "llama")
    tokens = _tokens(1)
    ref = _torch_logits(model, tokens)
    assert np.abs(ref - _torch_logits(base, tokens)).max() > 0.05
    ours = _mmjax_logits(module, full, tokens, adapter.config)
    assert np.abs(ours - ref).max() < TOL
    merged = L.merge(full, adapter.config)
    assert not L.lora_modules(merged)
    assert np.abs(_mmjax_logits(module, merged, tokens) - ref).max() < TOL


def test_export_roundtrip(saved, tmp_path):
    """mmjax LoRA weights -> peft directory -> PeftModel.from_pretrained: the same logits; the
    written tensors equal peft's own file."""
    base, base_dir, adapters = saved
    model, path = adapters["lora"]
    _, params = from_hf(base_dir)
    config = read_hf(base_dir)[2]
    full, adapter = peft_io.load_adapter(path, params, config, "llama")
    out = str(tmp_path / "exported")
    written = peft_io.export_adapter(full, adapter.config, config, out)
    assert sorted(written["target_modules"]) == sorted(TARGETS)
    ours, theirs = load_file(os.path.join(out, peft_io.WEIGHTS_FILE)), load_file(
        os.path.join(path, peft_io.WEIGHTS_FILE))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    tokens = _tokens(2)
    np.testing.assert_allclose(_torch_logits(reloaded, tokens), _torch_logits(model, tokens), atol=1e-6)


def test_init_equals_base_merge_and_dropout(saved):
    """Fresh LoRA (peft's A init, B zero) is exactly the base model; after B is trained
    (randomised) merged == unmerged in fp32, and unmerge restores the kernels; dropout acts on
    the LoRA path only."""
    _, base_dir, _ = saved
    module, params = from_hf(base_dir)
    tokens = jnp.asarray(_tokens(3), jnp.int32)
    plain = jax.jit(lambda p, t: module.apply({"params": p}, t))
    with jax.default_matmul_precision("highest"):
        base_logits = np.asarray(plain(params, tokens))
    cfgs = {init: L.LoraConfig(targets=MMJAX_TARGETS, r=4, alpha=16, init=init, dropout=0.5)
            for init in ("kaiming", "gaussian")}
    for init, cfg in cfgs.items():
        full = L.init_lora(module, params, cfg, jax.random.key(0), tokens)
        assert len(L.lora_modules(full)) == 14
        a = np.asarray(full["layers_0"]["attn"]["query"]["lora_a"])
        assert a.shape == (32, 4) and np.abs(a).max() > 0
        if init == "kaiming":  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert np.abs(a).max() <= 1 / np.sqrt(32) and np.abs(a).max() > 0.5 / np.sqrt(32)
        else:
            assert 0.15 < a.std() < 0.35  # N(0, (1/r)^2)
        assert np.asarray(full["layers_0"]["attn"]["out"]["lora_a"]).shape == (4, 8, 4)
        assert np.asarray(full["layers_0"]["attn"]["key"]["lora_b"]).shape == (4, 2, 8)
        assert not np.asarray(full["layers_0"]["attn"]["key"]["lora_b"]).any()
    cfg = cfgs["kaiming"]
    with L.lora(cfg):
        adapted = jax.jit(lambda p, t: module.apply({"params": p}, t))
        with jax.default_matmul_precision("highest"):
            np.testing.assert_array_equal(np.asarray(adapted(full, tokens)), base_logits)
    with L.lora(cfg, deterministic=False):
        dropped = jax.jit(lambda p, t, k: module.apply({"params": p}, t, rngs={"dropout": k}))
        # B = 0: dropout on the LoRA path changes nothing
        np.testing.assert_allclose(np.asarray(dropped(full, tokens, jax.random.key(1))), base_logits,
                                   atol=1e-6)
    # "train" B: nonzero
    rng = np.random.default_rng(0)
    trained = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(size=x.shape) * 0.2, x.dtype)
        if getattr(p[-1], "key", None) == L.LORA_B else x, full)
    with jax.default_matmul_precision("highest"):
        unmerged = np.asarray(adapted(trained, tokens))
        assert np.abs(unmerged - base_logits).max() > 0.05
        noisy = np.asarray(dropped(trained, tokens, jax.random.key(1)))
        assert np.abs(noisy - unmerged).max() > 1e-3
        merged_params = L.merge(trained, cfg)
        assert jax.tree_util.tree_structure(merged_params) == jax.tree_util.tree_structure(params)
        np.testing.assert_allclose(np.asarray(plain(merged_params, tokens)), unmerged, atol=1e-5)
    back = L.unmerge(merged_params, L.lora_params(trained), cfg)
    np.testing.assert_allclose(back["layers_1"]["mlp"]["down"]["kernel"],
                               params["layers_1"]["mlp"]["down"]["kernel"], atol=1e-6)
    np.testing.assert_array_equal(back["layers_1"]["mlp"]["down"]["lora_b"],
                                  trained["layers_1"]["mlp"]["down"]["lora_b"])


def test_scanned_layers():
    """LoRA through nn.scan + remat (params [layers, ...]): the leaves stack like the kernels,
    merged == unmerged."""
    import flax.linen as nn

    from mmjax.models import build_model

    module, _ = build_model("llama", dict(vocab_size=64, dim=32, num_layers=2, num_heads=4,
                                          num_kv_heads=2, mlp_dim=48, max_len=32,
                                          scan_layers=True, remat=True))
    tokens = jnp.asarray(_tokens(7, seq=8) % 64, jnp.int32)
    params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), tokens)["params"])
    cfg = L.LoraConfig(targets=(r"attn/(query|out)$",), r=4, alpha=8)
    full = L.init_lora(module, params, cfg, jax.random.key(1), tokens)
    attn = full["layers"]["block"]["attn"]
    assert attn["query"]["lora_a"].shape == (2, 32, 4) and attn["out"]["lora_a"].shape == (2, 4, 8, 4)
    assert np.abs(attn["query"]["lora_a"]).max() <= 1 / np.sqrt(32)  # fan_in 32, not 2 * 32
    b = attn["out"]["lora_b"]
    attn["out"]["lora_b"] = jnp.asarray(np.random.default_rng(0).normal(size=b.shape) * 0.2, b.dtype)
    plain = jax.jit(lambda p, t: module.apply({"params": p}, t))
    with L.lora(cfg), jax.default_matmul_precision("highest"):
        unmerged = np.asarray(jax.jit(lambda p, t: module.apply({"params": p}, t))(full, tokens))
    with jax.default_matmul_precision("highest"):
        assert np.abs(unmerged - np.asarray(plain(params, tokens))).max() > 0.05
        np.testing.assert_allclose(np.asarray(plain(L.merge(full, cfg), tokens)), unmerged, atol=1e-5)


def test_bad_lora_config(saved):
    _, base_dir, _ = saved
    module, params = from_hf(base_dir)
    tokens = jnp.asarray(_tokens(5), jnp.int32)
    with pytest.raises(InputError, match=r"'q_proj'.*closest: layers_0/attn/query"):
        L.init_lora(module, params, L.LoraConfig(targets=("attn/query$", "q_proj")),
                    jax.random.key(0), tokens)
    with pytest.raises(ConfigError, match="LoraConfig.r"):
        L.LoraConfig(targets=("query",), r=0)
    with pytest.raises(ConfigError, match="valid regex"):
        L.LoraConfig(targets=("(",))


def _edited(src, dst, config_edit=None, tensors_edit=None):
    shutil.copytree(src, dst)
    if config_edit:
        with open(os.path.join(dst, peft_io.CONFIG_FILE)) as f:
            cfg = json.load(f)
        config_edit(cfg)
        with open(os.path.join(dst, peft_io.CONFIG_FILE), "w") as f:
            json.dump(cfg, f)
    if tensors_edit:
        path = os.path.join(dst, peft_io.WEIGHTS_FILE)
        tensors = load_file(path)
        tensors_edit(tensors)
        save_file(tensors, path)
    return dst


def _set(**kv):
    return lambda cfg: cfg.update(kv)


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
BAD = {
    "bias": (_set(bias="all"), None, r"bias='all'"),
    "modules_to_save": (_set(modules_to_save=["lm_head"]), None, "modules_to_save"),
    "dora": (_set(use_dora=True), None, "use_dora"),
    "rank_pattern": (_set(rank_pattern={"q_proj": 2}), None, "rank_pattern"),
    "unknown_key": (_set(new_option=1), None, "new_option"),
    "other_arch": (lambda c: c["auto_mapping"].update(base_model_class="OPTForCausalLM"), None,
                   "OPTForCausalLM"),
    "embedding_target": (_set(target_modules=TARGETS + ["embed_tokens"]), None, "embed_tokens"),
    "no_such_target": (_set(target_modules=TARGETS + ["fc1"]), None, "'fc1'"),
    "shape": (None, lambda t: t.update({Q_A: np.zeros((4, 16), np.float32)}), r"q_proj.lora_A.*\(4, 16\)"),
    "foreign_module": (None, lambda t: t.update({
        "base_model.model.model.decoder.layers.0.fc1.lora_A.weight": np.zeros((4, 32), np.float32),
        "base_model.model.model.decoder.layers.0.fc1.lora_B.weight": np.zeros((48, 4), np.float32)}),
        "model.decoder.layers.0.fc1"),
    "missing_b": (None, lambda t: t.pop(Q_A.replace("lora_A", "lora_B")), "lora_A"),
}


def test_bad_adapters_exit_2(saved, tmp_path, capsys):
    _, base_dir, adapters = saved
    path = adapters["lora"][1]
    for case, (cfg_edit, tensors_edit, pattern) in BAD.items():
        bad = _edited(path, str(tmp_path / case), cfg_edit, tensors_edit)
        with pytest.raises((InputError, UnsupportedModelError), match=pattern):
            peft_io.load_adapter(bad, *from_hf(base_dir)[1:], read_hf(base_dir)[2], "llama",
                                 ("LlamaForCausalLM",))
    # through the command line: exit 2 with one line on stderr, before any model runs
    bad = str(tmp_path / "bias")
    assert cli.main(["compare", base_dir, "--adapter", bad, "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bias" in err[0]
    assert cli.main(["compare", base_dir, "--adapter", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
