"""Hugging Face `ViTModel` / `ViTForImageClassification` <-> mmjax `ViT`.

Config: every key of `config.json` is mapped to a `ViTConfig` field or is on an explicit list
of keys that do not change the function computed at inference; anything else raises
`UnsupportedModelError` naming the key.

Decisions on keys accepted without a field:
  * `hidden_dropout_prob`, `attention_probs_dropout_prob` (>= 0): dropout acts only in
    training; the converted model computes the HF model in `eval()` mode. Export writes 0.0.
  * `encoder_stride`: used only by `ViTForMaskedImageModeling`'s pixel decoder.
  * `id2label` / `label2id` / `problem_type`: label names and the training loss; for
    `ViTForImageClassification` the number of labels is `len(id2label)`.
  * `pooler_act`: must be "tanh" (the only pooler activation mmjax has).

The architecture decides the head: `ViTModel` keeps HF's pooler (Dense + tanh on the
normalised [CLS] token) as mmjax's `representation` layer; `ViTForImageClassification` has no
pooler and a linear classifier on the normalised [CLS] token (`num_classes`). A `ViTModel`
saved with `add_pooling_layer=False` lacks the pooler tensors and is refused by name.

Export of the "vit" family goes by the model's layout: the HF ViT layout exports as `vit`
(here), CLIP's image-tower layout as `clip_vision_model` (`CLIPVisionModel`,
`mmjax.convert.clip`), SigLIP's as `siglip_vision_model` (`SiglipVisionModel`,
`mmjax.convert.siglip`); an explicit `model_type` (e.g. recorded at conversion) picks one.

Weights: the patch convolution `[dim, C, ph, pw]` becomes a Dense kernel `[ph*pw*C, dim]` on
(row, column, channel)-ordered patches; `cls_token [1, 1, dim]` and `position_embeddings
[1, tokens, dim]` lose their leading ones; attention projections keep heads as their own
dimension as in `mmjax.convert.llama`. Images are NHWC in mmjax and NCHW in transformers:
transpose with `images_nchw.transpose(0, 2, 3, 1)`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Any, Iterable, Mapping

import numpy as np

from mmjax.configs import closest_name
from mmjax.convert.llama import ACTIVATIONS_FROM_HF, ACTIVATIONS_TO_HF, TensorRule
from mmjax.convert.trees import flatten, set_path, short_list
from mmjax.errors import ConfigError, InputError, UnsupportedModelError
from mmjax.models.vit import ViTConfig

ARCHITECTURES = ("ViTModel", "ViTForImageClassification")

# config.json key -> ViTConfig field
_DIRECT_KEYS = {
    "hidden_size": "dim",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "mlp_dim",
    "layer_norm_eps": "norm_eps",
    "image_size": "image_size",
    "patch_size": "patch_size",
    "num_channels": "channels",
    "qkv_bias": "qkv_bias",
    "initializer_range": "initializer_range",
}
_SPECIAL_KEYS = {"hidden_act", "pooler_output_size", "pooler_act", "id2label", "label2id",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "encoder_stride",
                 "problem_type"}
# bookkeeping keys of any transformers config
HARMLESS_KEYS = {
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "_name_or_path",
    "_attn_implementation", "_attn_implementation_autoset",
}
# transformers.ViTConfig class defaults, used when a key is absent
_HF_DEFAULTS = dict(dim=768, num_layers=12, num_heads=12, mlp_dim=3072, norm_eps=1e-12,
                    image_size=224, patch_size=16, channels=3, qkv_bias=True, initializer_range=0.02)
# mmjax fields fixed by the HF ViT architecture
_HF_LAYOUT = dict(pool="cls", posemb="learned", class_token=True, pre_norm=False, patch_bias=True)


# --- config ---------------------------------------------------------------------------------

def check_config_keys(hf: Mapping[str, Any], known: Iterable[str], what: str) -> None:
    """UnsupportedModelError naming every key of `hf` outside `known` (with a close match)."""
    known = set(known)
    unknown = [k for k in hf if k not in known]
    if unknown:
        hints = "; ".join(f"{k!r}{closest_name(k, known)}" for k in unknown)
        raise UnsupportedModelError(
            f"{what}: unsupported key(s) {hints} (mmjax maps every key it accepts; an unknown "
            "one could change the model)"
        )


def activation_from_hf(act: Any, key: str = "hidden_act") -> str:
    if act not in ACTIVATIONS_FROM_HF:
        raise UnsupportedModelError(f"{key} {act!r} is not supported; supported: "
                                    f"{', '.join(ACTIVATIONS_FROM_HF)}")
    return ACTIVATIONS_FROM_HF[act]


def activation_to_hf(act: str) -> str:
    if act not in ACTIVATIONS_TO_HF:
        raise UnsupportedModelError(f"activation {act!r} has no Hugging Face hidden_act")
    return ACTIVATIONS_TO_HF[act]


def check_dropout(hf: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        value = hf.get(key, 0.0)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value < 0):
            raise UnsupportedModelError(f"{key} must be a number >= 0, got {value!r}")


def architecture_of(hf: Mapping[str, Any], default: str) -> str:
    archs = hf.get("architectures") or [default]
    if isinstance(archs, str):
        archs = [archs]
    if len(archs) != 1:
        raise UnsupportedModelError(f"config.json lists {len(archs)} architectures {archs}; expected one")
    return archs[0]


def config_from_hf(hf: Mapping[str, Any]) -> ViTConfig:
    """`ViTConfig` for a parsed ViT `config.json` (strict, see the module docstring)."""
    if hf.get("model_type") != "vit":
        raise UnsupportedModelError(f"model_type {hf.get('model_type')!r} is not handled by the ViT "
                                    "converter; supported: vit")
    check_config_keys(hf, set(_DIRECT_KEYS) | _SPECIAL_KEYS | HARMLESS_KEYS, "vit config.json")
    arch = architecture_of(hf, "ViTModel")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"architecture {arch!r} is not supported for model_type 'vit'; "
                                    f"supported: {', '.join(ARCHITECTURES)}")
    kw: dict[str, Any] = dict(_HF_DEFAULTS)
    for hf_key, field in _DIRECT_KEYS.items():
        if hf_key in hf:
            kw[field] = hf[hf_key]
    for key in ("image_size", "patch_size"):
        if isinstance(kw[key], list):
            kw[key] = tuple(kw[key])
    kw["activation"] = activation_from_hf(hf.get("hidden_act", "gelu"))
    check_dropout(hf, "hidden_dropout_prob", "attention_probs_dropout_prob")
    if hf.get("pooler_act", "tanh") != "tanh":
        raise UnsupportedModelError(f"pooler_act {hf['pooler_act']!r} is not supported; supported: tanh")
    if arch == "ViTForImageClassification":
        labels = hf.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"}
        if not isinstance(labels, Mapping) or not labels:
            raise UnsupportedModelError(f"id2label must be a non-empty object, got {labels!r}")
        kw["num_classes"] = len(labels)
    else:
        kw["representation"] = hf.get("pooler_output_size") or kw["dim"]
    try:
        return ViTConfig(**kw, **_HF_LAYOUT)
    except (ConfigError, TypeError, ValueError) as e:
        raise UnsupportedModelError(f"vit config.json: {e}") from None


def _check_exportable(config: ViTConfig) -> None:
    differ = [f"{k}={getattr(config, k)!r}" for k, v in _HF_LAYOUT.items() if getattr(config, k) != v]
    if differ:
        raise UnsupportedModelError(
            f"cannot export this ViT to Hugging Face ViT: {', '.join(differ)} (HF ViT has "
            + ", ".join(f"{k}={v!r}" for k, v in _HF_LAYOUT.items()) + ")"
        )


EXPORT_MODEL_TYPES = ("vit", "clip_vision_model", "siglip_vision_model")


def export_model_type(config: ViTConfig, model_type: str | None = None) -> str:
    """The HF model_type a ViT exports as: `model_type` when given, else the one whose layout
    the config has (HF ViT when none matches, which then names the differences)."""
    if model_type is not None:
        if model_type not in EXPORT_MODEL_TYPES:
            raise UnsupportedModelError(f"cannot export a ViT as model_type {model_type!r}; supported: "
                                        f"{', '.join(EXPORT_MODEL_TYPES)}")
        return model_type
    from mmjax.models.clip import CLIP_VISION_LAYOUT
    from mmjax.models.siglip import SIGLIP_VISION_LAYOUT

    for name, layout in (("clip_vision_model", CLIP_VISION_LAYOUT),
                         ("siglip_vision_model", SIGLIP_VISION_LAYOUT)):
        keys = ("pool", "posemb", "class_token", "pre_norm", "patch_bias", "qkv_bias")
        if all(getattr(config, k) == layout[k] for k in keys):
            return name
    return "vit"


def config_to_hf(config: ViTConfig, model_type: str | None = None) -> dict[str, Any]:
    """`config.json` dict for the model type `export_model_type` picks (see the module
    docstring); for HF ViT, `ViTForImageClassification` when the model has a classification
    head (and no pre-logits layer), `ViTModel` when it has a pre-logits layer (HF's pooler)."""
    target = export_model_type(config, model_type)
    if target == "clip_vision_model":
        from mmjax.convert.clip import vision_model_config_to_hf

        return vision_model_config_to_hf(config)
    if target == "siglip_vision_model":
        from mmjax.convert.siglip import vision_model_config_to_hf

        return vision_model_config_to_hf(config)
    _check_exportable(config)
    hf: dict[str, Any] = {
        "model_type": "vit",
        "hidden_size": config.dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": activation_to_hf(config.activation),
        "layer_norm_eps": config.norm_eps,
        "image_size": list(config.image_size) if isinstance(config.image_size, tuple) else config.image_size,
        "patch_size": list(config.patch_size) if isinstance(config.patch_size, tuple) else config.patch_size,
        "num_channels": config.channels,
        "qkv_bias": config.qkv_bias,
        "initializer_range": config.initializer_range,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "encoder_stride": config.patch_hw[0],
        "pooler_act": "tanh",
        "dtype": "float32",
    }
    if config.num_classes:
        if config.representation:
            raise UnsupportedModelError(
                "cannot export a ViT with both a pre-logits layer (representation) and a head: HF "
                "ViTForImageClassification has no pooler before its classifier")
        hf["architectures"] = ["ViTForImageClassification"]
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_classes)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_classes)}
    else:
        if not config.representation:
            raise UnsupportedModelError(
                "cannot export a features-only ViT without a pre-logits layer: HF ViTModel always "
                "has a pooler (Dense + tanh); set representation=dim or add a classification head")
        hf["architectures"] = ["ViTModel"]
        hf["pooler_output_size"] = config.representation
    try:
        hf["transformers_version"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        pass
    return hf


# --- weights --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VisionTensorRule(TensorRule):
    """`TensorRule` plus two layouts of vision checkpoints.

    kind "patch": a stride-patch Conv2d weight [dim, C, ph, pw] <-> Dense kernel
    [ph*pw*C, dim]; kind "squeeze": HF's leading size-1 dims dropped ([1, 1, dim] -> [dim]);
    kind "scalar": a one-element tensor (SigLIP's logit_scale [1]) <-> a 0-d param.
    """

    @property
    def mmjax_shape(self) -> tuple[int, ...]:
        s = self.hf_shape
        if self.kind == "patch":
            return (s[2] * s[3] * s[1], s[0])
        if self.kind == "scalar":
            return ()
        if self.kind == "squeeze":
            shape = tuple(s)
            while len(shape) > 1 and shape[0] == 1:
                shape = shape[1:]
            return shape
        return super().mmjax_shape

    def to_mmjax(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "patch":
            return w.transpose(2, 3, 1, 0).reshape(self.mmjax_shape)
        if self.kind in ("squeeze", "scalar"):
            return w.reshape(self.mmjax_shape)
        return super().to_mmjax(w)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "patch":
            d, c, ph, pw = self.hf_shape
            return w.reshape(ph, pw, c, d).transpose(3, 2, 0, 1)
        if self.kind in ("squeeze", "scalar"):
            return w.reshape(self.hf_shape)
        return super().to_hf(w)


def encoder_layer_rules(hf: str, mj: str, dim: int, heads: int, mlp: int, qkv_bias: bool,
                        names: Mapping[str, str]) -> list[VisionTensorRule]:
    """Rules of one pre-norm encoder block (`mmjax.models.vit.EncoderBlock`) whose HF tensor
    names are `hf` + names[role] for the roles ln1, q, k, v, o, ln2, fc1, fc2."""
    R = VisionTensorRule
    rules = [R(f"{hf}{names['ln1']}.weight", (mj, "attn_norm", "scale"), (dim,), "copy"),
             R(f"{hf}{names['ln1']}.bias", (mj, "attn_norm", "bias"), (dim,), "copy")]
    for role, name in (("q", "query"), ("k", "key"), ("v", "value")):
        rules.append(R(f"{hf}{names[role]}.weight", (mj, "attn", name, "kernel"), (dim, dim), "in_proj", heads))
        if qkv_bias:
            rules.append(R(f"{hf}{names[role]}.bias", (mj, "attn", name, "bias"), (dim,), "in_bias", heads))
    rules += [
        R(f"{hf}{names['o']}.weight", (mj, "attn", "out", "kernel"), (dim, dim), "out_proj", heads),
        R(f"{hf}{names['o']}.bias", (mj, "attn", "out", "bias"), (dim,), "copy"),
        R(f"{hf}{names['ln2']}.weight", (mj, "mlp_norm", "scale"), (dim,), "copy"),
        R(f"{hf}{names['ln2']}.bias", (mj, "mlp_norm", "bias"), (dim,), "copy"),
        R(f"{hf}{names['fc1']}.weight", (mj, "mlp", "fc1", "kernel"), (mlp, dim), "linear"),
        R(f"{hf}{names['fc1']}.bias", (mj, "mlp", "fc1", "bias"), (mlp,), "copy"),
        R(f"{hf}{names['fc2']}.weight", (mj, "mlp", "fc2", "kernel"), (dim, mlp), "linear"),
        R(f"{hf}{names['fc2']}.bias", (mj, "mlp", "fc2", "bias"), (dim,), "copy"),
    ]
    return rules


_VIT_LAYER_NAMES = {
    "ln1": "layernorm_before", "q": "attention.attention.query", "k": "attention.attention.key",
    "v": "attention.attention.value", "o": "attention.output.dense", "ln2": "layernorm_after",
    "fc1": "intermediate.dense", "fc2": "output.dense",
}


def tensor_rules(c: ViTConfig) -> list[VisionTensorRule]:
    """Every tensor of an HF ViT checkpoint of `c` (classification models under `vit.`)."""
    R = VisionTensorRule
    d = c.dim
    ph, pw = c.patch_hw
    p = "vit." if c.num_classes else ""
    rules = [
        R(p + "embeddings.cls_token", ("cls",), (1, 1, d), "squeeze"),
        R(p + "embeddings.patch_embeddings.projection.weight", ("patch_embed", "kernel"),
          (d, c.channels, ph, pw), "patch"),
        R(p + "embeddings.patch_embeddings.projection.bias", ("patch_embed", "bias"), (d,), "copy"),
        R(p + "embeddings.position_embeddings", ("pos_embedding", "embedding"), (1, c.num_tokens, d),
          "squeeze"),
    ]
    for i in range(c.num_layers):
        rules += encoder_layer_rules(f"{p}encoder.layer.{i}.", f"layers_{i}", d, c.num_heads, c.mlp_dim,
                                     c.qkv_bias, _VIT_LAYER_NAMES)
    rules += [R(p + "layernorm.weight", ("final_norm", "scale"), (d,), "copy"),
              R(p + "layernorm.bias", ("final_norm", "bias"), (d,), "copy")]
    if c.representation:
        rules += [R("pooler.dense.weight", ("pre_logits", "kernel"), (c.representation, d), "linear"),
                  R("pooler.dense.bias", ("pre_logits", "bias"), (c.representation,), "copy")]
    if c.num_classes:
        width = c.representation or d
        rules += [R("classifier.weight", ("head", "kernel"), (c.num_classes, width), "linear"),
                  R("classifier.bias", ("head", "bias"), (c.num_classes,), "copy")]
    return rules


def apply_rules_from_hf(tensors: Mapping[str, np.ndarray], rules: list[TensorRule],
                        what: str = "checkpoint") -> dict[str, Any]:
    """Nested mmjax params (float32 numpy) from HF `tensors`; InputError naming missing,
    unexpected and wrongly shaped tensors."""
    expected = {r.hf_name for r in rules}
    missing = [r.hf_name for r in rules if r.hf_name not in tensors]
    extra = sorted(k for k in tensors if k not in expected)
    if missing:
        raise InputError(f"{what} lacks {len(missing)} tensor(s) the config needs: {short_list(missing)}")
    if extra:
        raise InputError(f"{what} has {len(extra)} unexpected tensor(s): {short_list(extra)}")
    params: dict[str, Any] = {}
    for r in rules:
        w = tensors[r.hf_name]
        if tuple(w.shape) != r.hf_shape:
            raise InputError(f"tensor {r.hf_name}: shape {tuple(w.shape)} in the {what}, but the "
                             f"config needs {r.hf_shape}")
        # (reshape: np.ascontiguousarray turns a 0-d array such as CLIP's logit_scale into 1-d)
        set_path(params, r.path, np.ascontiguousarray(r.to_mmjax(np.asarray(w, np.float32))).reshape(r.mmjax_shape))
    return params


def apply_rules_to_hf(params: Mapping[str, Any], rules: list[TensorRule]) -> dict[str, np.ndarray]:
    """HF tensors {name: float32 array} from plain nested mmjax params."""
    leaves = dict(flatten(params))
    expected = {r.path for r in rules}
    missing = ["/".join(r.path) for r in rules if r.path not in leaves]
    extra = sorted("/".join(p) for p in leaves if p not in expected)
    if missing:
        raise InputError(f"params lack {len(missing)} entr(ies) the config needs: {short_list(missing)}")
    if extra:
        raise InputError(f"params have {len(extra)} unexpected entr(ies): {short_list(extra)}")
    out = {}
    for r in rules:
        w = np.asarray(leaves[r.path], np.float32)
        if tuple(w.shape) != r.mmjax_shape:
            raise InputError(f"param {'/'.join(r.path)}: shape {tuple(w.shape)}, but the config needs "
                             f"{r.mmjax_shape}")
        out[r.hf_name] = np.ascontiguousarray(r.to_hf(w)).reshape(r.hf_shape)
    return out


def params_from_hf(tensors: Mapping[str, np.ndarray], config: ViTConfig) -> dict[str, Any]:
    """mmjax ViT params (nested dict of float32 numpy arrays) from HF ViT tensors."""
    return apply_rules_from_hf(tensors, tensor_rules(config))


def params_to_hf(params: Mapping[str, Any], config: ViTConfig) -> dict[str, np.ndarray]:
    """HF tensors from plain mmjax ViT params, for the model type of the config's layout
    (`export_model_type`)."""
    target = export_model_type(config)
    if target == "clip_vision_model":
        from mmjax.convert.clip import vision_model_params_to_hf

        return vision_model_params_to_hf(params, config)
    if target == "siglip_vision_model":
        from mmjax.convert.siglip import vision_model_params_to_hf

        return vision_model_params_to_hf(params, config)
    _check_exportable(config)
    return apply_rules_to_hf(params, tensor_rules(config))


def strip_prefix(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """`tensors` with `prefix` removed from every name when all names carry it (checkpoints of
    stand-alone towers written by older transformers versions nest them under e.g.
    `vision_model.`; transformers 5 writes them without)."""
    if tensors and all(k.startswith(prefix) for k in tensors):
        return {k[len(prefix):]: v for k, v in tensors.items()}
    return dict(tensors)


def _make_converter():
    from mmjax.convert.registry import Converter

    return Converter(
        family="vit",
        model_types=("vit",),
        architectures=ARCHITECTURES,
        task="image_encoder",
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        params_from_hf=params_from_hf,
        params_to_hf=params_to_hf,
    )


CONVERTER = _make_converter()
