"""The conversion core (`mmjax.convert.core`) on its own: every layout kind both ways (and what
each means: the mmjax param computes what the HF tensor computes), MoE expert stacking, the
strict errors naming the tensor or param, derived buffers, packed rows, the shared config
helpers, and the registry derived from the converter records. numpy only: no torch, no model."""

import numpy as np
import pytest

from mmjax.convert import registry
from mmjax.convert.core import (LAYOUT_KINDS, Converter, TensorRule, activation_from_hf,
                                activation_to_hf, apply_rules_from_hf, apply_rules_to_hf,
                                check_config_keys, check_dropout, join_rows, split_rows)
from mmjax.errors import InputError, UnsupportedModelError

RNG = np.random.default_rng(0)
D, H, HD, C, P = 8, 2, 3, 3, 2  # dim, heads, head dim, channels, patch


def rnd(*shape):
    return RNG.normal(size=shape).astype(np.float32)


# one rule of every kind, with its HF tensor
CASES = {
    "copy": TensorRule("norm.weight", ("norm", "scale"), (D,), "copy"),
    "linear": TensorRule("fc.weight", ("fc", "kernel"), (5, D), "linear"),
    "in_proj": TensorRule("q.weight", ("attn", "query", "kernel"), (H * HD, D), "in_proj", H),
    "in_bias": TensorRule("q.bias", ("attn", "query", "bias"), (H * HD,), "in_bias", H),
    "out_proj": TensorRule("o.weight", ("attn", "out", "kernel"), (D, H * HD), "out_proj", H),
    "patch": TensorRule("patch.weight", ("patch_embed", "kernel"), (D, C, P, P), "patch"),
    "squeeze": TensorRule("cls_token", ("cls",), (1, 1, D), "squeeze"),
    "scalar": TensorRule("logit_scale", ("logit_scale",), (1,), "scalar"),
}
MMJAX_SHAPES = {"copy": (D,), "linear": (D, 5), "in_proj": (D, H, HD), "in_bias": (H, HD),
                "out_proj": (H, HD, D), "patch": (P * P * C, D), "squeeze": (D,), "scalar": ()}


def test_every_kind_is_covered():
    assert set(CASES) == set(LAYOUT_KINDS)


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_each_kind_round_trips(kind):
    rule = CASES[kind]
    hf = {rule.hf_name: rnd(*rule.hf_shape)}
    params = apply_rules_from_hf(hf, [rule])
    leaf = _leaf(params, rule.path)
    assert leaf.shape == rule.mmjax_shape == MMJAX_SHAPES[kind]
    assert leaf.dtype == np.float32 and leaf.flags.c_contiguous
    back = apply_rules_to_hf(params, [rule])
    assert list(back) == [rule.hf_name]
    assert back[rule.hf_name].shape == rule.hf_shape
    np.testing.assert_array_equal(back[rule.hf_name], hf[rule.hf_name])


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _mm(rule, w):
    """The mmjax param `rule` makes of HF tensor `w`."""
    return _leaf(apply_rules_from_hf({rule.hf_name: w}, [rule]), rule.path)


def test_the_layouts_compute_what_hf_computes():
    x = rnd(D)
    w = rnd(5, D)  # linear: HF y = W x; mmjax y = x @ kernel
    np.testing.assert_allclose(x @ _mm(CASES["linear"], w), w @ x, rtol=1e-5, atol=1e-6)
    w = rnd(H * HD, D)  # q projection: heads kept as their own dimension
    np.testing.assert_allclose(np.einsum("d,dhk->hk", x, _mm(CASES["in_proj"], w)),
                               (w @ x).reshape(H, HD), rtol=1e-5, atol=1e-6)
    b = rnd(H * HD)
    np.testing.assert_array_equal(_mm(CASES["in_bias"], b), b.reshape(H, HD))
    a, w = rnd(H, HD), rnd(D, H * HD)  # output projection from per-head values
    np.testing.assert_allclose(np.einsum("hk,hkd->d", a, _mm(CASES["out_proj"], w)),
                               w @ a.reshape(-1), rtol=1e-5, atol=1e-6)
    patch, w = rnd(C, P, P), rnd(D, C, P, P)  # Conv2d on one patch == Dense on (row, col, channel)
    np.testing.assert_allclose(patch.transpose(1, 2, 0).reshape(-1) @ _mm(CASES["patch"], w),
                               np.einsum("chw,dchw->d", patch, w), rtol=1e-5, atol=1e-6)


def test_moe_experts_stack_into_one_param_and_split_back():
    rules = [TensorRule(f"experts.{j}.w1.weight", ("moe", "gate"), (5, D), "linear", expert=j)
             for j in range(3)]
    hf = {r.hf_name: rnd(5, D) for r in rules}
    params = apply_rules_from_hf(hf, rules)
    assert params["moe"]["gate"].shape == (3, D, 5)
    np.testing.assert_array_equal(params["moe"]["gate"][1], hf["experts.1.w1.weight"].T)
    back = apply_rules_to_hf(params, rules)
    for name in hf:
        np.testing.assert_array_equal(back[name], hf[name])
    with pytest.raises(InputError, match=r"param moe/gate: shape \(2, 8, 5\).*\(3, 8, 5\)"):
        apply_rules_to_hf({"moe": {"gate": params["moe"]["gate"][:2]}}, rules)


RULES = [CASES["linear"], CASES["copy"], CASES["in_proj"]]


def _hf():
    return {r.hf_name: rnd(*r.hf_shape) for r in RULES}


def test_a_missing_tensor_is_named():
    hf = _hf()
    del hf["q.weight"]
    with pytest.raises(InputError, match=r"checkpoint lacks 1 tensor\(s\) the config needs: q\.weight"):
        apply_rules_from_hf(hf, RULES)


def test_an_unexpected_tensor_is_named_and_derived_buffers_are_skipped():
    hf = {**_hf(), "layers.0.extra.weight": rnd(2)}
    with pytest.raises(InputError, match=r"checkpoint has 1 unexpected tensor\(s\): layers\.0\.extra\.weight"):
        apply_rules_from_hf(hf, RULES)
    hf = {**_hf(), "layers.0.rotary_emb.inv_freq": rnd(4)}
    with pytest.raises(InputError, match="rotary_emb.inv_freq"):
        apply_rules_from_hf(hf, RULES)
    params = apply_rules_from_hf(hf, RULES, derived=("rotary_emb.inv_freq",))
    assert set(params) == {"fc", "norm", "attn"}


def test_a_wrongly_shaped_tensor_is_named_with_both_shapes():
    hf = {**_hf(), "fc.weight": rnd(4, D)}
    with pytest.raises(InputError, match=r"tensor fc\.weight: shape \(4, 8\) in the tower checkpoint, "
                                         r"but the config needs \(5, 8\)"):
        apply_rules_from_hf(hf, RULES, what="tower checkpoint")


def test_export_errors_name_the_param():
    params = apply_rules_from_hf(_hf(), RULES)
    missing = {k: v for k, v in params.items() if k != "norm"}
    with pytest.raises(InputError, match=r"params lack 1 entr\(ies\) the config needs: norm/scale"):
        apply_rules_to_hf(missing, RULES)
    with pytest.raises(InputError, match=r"params have 1 unexpected entr\(ies\): extra/bias"):
        apply_rules_to_hf({**params, "extra": {"bias": np.zeros(2)}}, RULES)
    with pytest.raises(InputError, match=r"param fc/kernel: shape \(5, 8\), but the config needs \(8, 5\)"):
        apply_rules_to_hf({**params, "fc": {"kernel": np.zeros((5, D))}}, RULES)


def test_bad_rule_tables_fail_loudly():
    with pytest.raises(ValueError, match="unknown kind 'transpose'"):
        TensorRule("x", ("x",), (2, 2), "transpose")
    with pytest.raises(ValueError, match="needs heads > 0"):
        TensorRule("x", ("x",), (2, 2), "in_proj")
    with pytest.raises(ValueError, match="names fc.weight twice"):
        apply_rules_from_hf(_hf(), RULES + [CASES["linear"]])


def test_rules_move_under_a_prefix():
    rule = CASES["copy"].under("text")
    assert rule.path == ("text", "norm", "scale") and rule.hf_name == "norm.weight"


def test_packed_rows_split_and_join():
    fused = {"attn.in_proj_weight": ("attn.q.weight", "attn.k.weight", "attn.v.weight")}
    w = rnd(3 * D, D)
    parts = split_rows({"attn.in_proj_weight": w, "other": rnd(2)}, fused)
    assert sorted(parts) == ["attn.k.weight", "attn.q.weight", "attn.v.weight", "other"]
    np.testing.assert_array_equal(parts["attn.k.weight"], w[D:2 * D])
    np.testing.assert_array_equal(join_rows(parts, fused)["attn.in_proj_weight"], w)
    with pytest.raises(InputError, match=r"attn\.in_proj_weight: first dimension 7 is not 3 x dim"):
        split_rows({"attn.in_proj_weight": rnd(7, D)}, fused)


def test_config_helpers():
    with pytest.raises(UnsupportedModelError, match=r"vit config.json: unsupported key\(s\) "
                                                    r"'hiden_size' \(did you mean 'hidden_size'\?\)"):
        check_config_keys({"hiden_size": 4, "use_cache": True}, {"hidden_size"}, "vit config.json")
    check_config_keys({"hidden_size": 4, "transformers_version": "5", "_name_or_path": "x"},
                      {"hidden_size"}, "x")  # bookkeeping keys are accepted
    assert activation_from_hf("gelu_pytorch_tanh") == "gelu_tanh"
    assert activation_to_hf(activation_from_hf("swish")) == "silu"
    with pytest.raises(UnsupportedModelError, match="text_config.hidden_act 'mish' is not supported"):
        activation_from_hf("mish", "text_config.hidden_act")
    with pytest.raises(UnsupportedModelError, match="has no Hugging Face hidden_act"):
        activation_to_hf("squared_relu")
    check_dropout({"attention_dropout": 0.1, "hidden_dropout": None}, "attention_dropout", "hidden_dropout")
    for bad in (-0.1, "0.1", True):
        with pytest.raises(UnsupportedModelError, match="attention_dropout must be a number >= 0"):
            check_dropout({"attention_dropout": bad}, "attention_dropout")


# --- the registry, derived from the records -------------------------------------------------

def test_the_registry_is_the_union_of_the_converter_records():
    records = registry.converters()
    assert all(isinstance(c, Converter) for c in records)
    assert registry.supported_model_types() == sorted({t for c in records for t in c.model_types})
    assert set(registry.supported_model_types()) >= {
        "llama", "mistral", "mixtral", "vit", "clip", "clip_vision_model", "clip_text_model",
        "siglip", "siglip_vision_model"}
    for c in records:
        assert c.compare is not None, c.model_types  # every converted class has a compare runner
        for t in c.model_types:
            assert registry.for_hf_config({"model_type": t, "architectures": [c.architectures[0]]}) is c
    for family in {c.family for c in records}:
        assert registry.for_family(family).export_when is None


def test_registry_errors_list_what_is_supported():
    with pytest.raises(UnsupportedModelError, match=r"unsupported model_type 'lama' \(did you mean "
                                                    r"'llama'\?\); supported: ([\w-]+, )*clip, .*llama"):
        registry.for_model_type("lama")
    with pytest.raises(UnsupportedModelError, match="LlamaForTokenClassification.*LlamaForCausalLM.*"
                                                    "LlamaForSequenceClassification"):
        registry.for_hf_config({"model_type": "llama", "architectures": ["LlamaForTokenClassification"]})
    with pytest.raises(UnsupportedModelError, match="no Hugging Face exporter for mmjax family 'gpt'"):
        registry.for_family("gpt")


def test_export_picks_the_record_by_model_type_or_layout():
    from mmjax.models.clip import CLIP_VISION_LAYOUT
    from mmjax.models.llama import LlamaConfig
    from mmjax.models.siglip import SIGLIP_VISION_LAYOUT
    from mmjax.models.vit import ViTConfig

    small = dict(dim=16, num_layers=1, num_heads=2, mlp_dim=32, image_size=8, patch_size=4)
    assert registry.for_export("vit", ViTConfig(**small)).model_types == ("vit",)
    assert registry.for_export("vit", ViTConfig(**small, **CLIP_VISION_LAYOUT)).model_types == ("clip_vision_model",)
    assert registry.for_export("vit", ViTConfig(**small, **SIGLIP_VISION_LAYOUT)).model_types == ("siglip_vision_model",)
    assert registry.for_export("vit", ViTConfig(**small), "siglip_vision_model").model_types == ("siglip_vision_model",)
    moe = LlamaConfig(vocab_size=32, dim=16, num_layers=1, num_heads=2, mlp_dim=32, num_experts=2)
    assert registry.for_export("llama", moe).model_types == ("mixtral",)
    assert registry.for_export("llama", moe.replace(num_experts=0)).model_types == ("llama", "mistral")
    with pytest.raises(UnsupportedModelError, match="cannot export mmjax family 'vit' as model_type 'gpt2'; "
                                                    "supported: .*clip_vision_model"):
        registry.for_export("vit", ViTConfig(**small), "gpt2")


def test_a_converter_module_that_does_not_import_leaves_the_others_working(monkeypatch):
    real = registry.importlib.import_module

    def import_module(name, *args):
        if name == "mmjax.convert.siglip":
            raise ImportError("simulated missing dependency")
        return real(name, *args)

    monkeypatch.setattr(registry.importlib, "import_module", import_module)
    registry._discovered.cache_clear()
    try:
        assert registry.for_model_type("llama").family == "llama"
        assert "siglip" not in registry.supported_model_types()
        with pytest.raises(UnsupportedModelError, match=r"unsupported model_type 'siglip'.*"
                                                        r"mmjax\.convert\.siglip could not be imported: "
                                                        r"ImportError: simulated missing dependency"):
            registry.for_model_type("siglip")
    finally:
        monkeypatch.undo()
        registry._discovered.cache_clear()
    assert registry.for_model_type("siglip").family == "siglip"
