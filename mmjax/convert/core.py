"""The conversion core: what every family converter (`mmjax/convert/<family>.py`) is built from.

  * `Converter`: the record a converter module exposes (`CONVERTER`, or `CONVERTERS = (...)`);
    `mmjax.convert.registry` discovers the records, nothing else lists them.
  * `TensorRule` + `apply_rules_from_hf` / `apply_rules_to_hf`: one HF tensor <-> one mmjax
    param with a named layout change, and the one strict engine that applies a list of rules
    both ways (missing, unexpected and wrongly shaped tensors raise `InputError` naming them).
  * `split_rows` / `join_rows`: HF tensors that pack several mmjax params along their first
    dimension (`torch.nn.MultiheadAttention`'s `in_proj_weight`), unpacked before the rules.
  * config helpers shared by the families: HF activation names both ways, the bookkeeping keys
    every transformers config may carry, the unknown-key check with "did you mean" hints,
    dropout / bool checks, architecture and model_type checks, `transformers_version` stamping.

Nothing here knows a model family; the per-family knowledge (key tables, defaults, rule lists,
the `compare` runner) lives in the family's converter file.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from mmjax.configs import closest_name
from mmjax.convert.trees import flatten, set_path, short_list
from mmjax.errors import ConfigError, InputError, UnsupportedModelError

# --- the converter record -------------------------------------------------------------------

# compare(hf_dir, module, config, np_params, batch, seq_len, seed, torch, transformers)
#   -> (diffs {output name: max |diff|}, extra report entries)
CompareRunner = Callable[..., tuple[dict[str, float], dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Converter:
    """Conversion between one Hugging Face model type group and one mmjax model family.

    family: the mmjax family name for `mmjax.models.build_model`.
    model_types: HF `model_type` values handled (unique across all converters).
    architectures: HF `architectures` entries accepted (e.g. "LlamaForCausalLM").
    config_from_hf(hf_config_dict) -> mmjax config dataclass (strict: unknown keys raise).
    config_to_hf(config, model_type) -> HF config dict (`model_type` None = best guess).
    params_from_hf(tensors, config) -> mmjax params (nested dict of numpy arrays).
    params_to_hf(params, config) -> {HF tensor name: numpy array}.
    compare: the `mmjax compare` runner (see `CompareRunner`): builds random inputs, runs the
      transformers model and the mmjax one, returns (diffs, extra); None = no runner.
    export_when(config) -> bool: None for the family's default exporter (exactly one per
      family); a predicate for a record that exports the family's configs it matches when no
      `model_type` is asked (a ViT with CLIP's image-tower layout exports as CLIPVisionModel).
    """

    family: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    config_from_hf: Callable[[Mapping[str, Any]], Any]
    config_to_hf: Callable[[Any, str | None], dict[str, Any]]
    params_from_hf: Callable[[Mapping[str, np.ndarray], Any], dict[str, Any]]
    params_to_hf: Callable[[Mapping[str, Any], Any], dict[str, np.ndarray]]
    compare: CompareRunner | None = None
    export_when: Callable[[Any], bool] | None = None


# --- tensor rules ---------------------------------------------------------------------------

def _squeezed(s: tuple[int, ...]) -> tuple[int, ...]:
    while len(s) > 1 and s[0] == 1:
        s = s[1:]
    return s


# kind -> (mmjax shape of (hf_shape, heads), HF -> mmjax, mmjax -> HF); the converters take
# (array, rule). HF stores linear layers as [out, in]; mmjax as [in, out] and keeps attention
# heads as their own dimension.
_LAYOUTS: dict[str, tuple[Callable, Callable, Callable]] = {
    # same layout
    "copy": (lambda s, h: s, lambda w, r: w, lambda w, r: w),
    # [out, in] <-> [in, out]
    "linear": (lambda s, h: s[::-1], lambda w, r: w.T, lambda w, r: w.T),
    # q/k/v projection [heads*hd, dim] <-> [dim, heads, hd]
    "in_proj": (lambda s, h: (s[1], h, s[0] // h),
                lambda w, r: w.T.reshape(r.mmjax_shape), lambda w, r: w.reshape(w.shape[0], -1).T),
    # q/k/v bias [heads*hd] <-> [heads, hd]
    "in_bias": (lambda s, h: (h, s[0] // h),
                lambda w, r: w.reshape(r.mmjax_shape), lambda w, r: w.reshape(-1)),
    # output projection [dim, heads*hd] <-> [heads, hd, dim]
    "out_proj": (lambda s, h: (h, s[1] // h, s[0]),
                 lambda w, r: w.T.reshape(r.mmjax_shape), lambda w, r: w.reshape(-1, w.shape[-1]).T),
    # stride-patch Conv2d [dim, C, ph, pw] <-> Dense kernel [ph*pw*C, dim] on (row, column,
    # channel)-ordered patches
    "patch": (lambda s, h: (s[2] * s[3] * s[1], s[0]),
              lambda w, r: w.transpose(2, 3, 1, 0).reshape(r.mmjax_shape),
              lambda w, r: w.reshape(r.hf_shape[2], r.hf_shape[3], r.hf_shape[1], r.hf_shape[0])
              .transpose(3, 2, 0, 1)),
    # leading size-1 dims dropped ([1, 1, dim] <-> [dim])
    "squeeze": (lambda s, h: _squeezed(s), lambda w, r: w.reshape(r.mmjax_shape),
                lambda w, r: w.reshape(r.hf_shape)),
    # a one-element tensor ([1]) <-> a 0-d param
    "scalar": (lambda s, h: (), lambda w, r: w.reshape(()), lambda w, r: w.reshape(r.hf_shape)),
}
LAYOUT_KINDS = tuple(_LAYOUTS)
_HEADED = ("in_proj", "in_bias", "out_proj")


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One HF tensor <-> one mmjax param, with the layout change between them.

    hf_name: the tensor's name in the checkpoint; path: the param's path in the mmjax tree;
    hf_shape: the tensor's shape as the config implies it.
    kind: one of `LAYOUT_KINDS` -- "copy" (same layout), "linear" (HF [out, in] -> [in, out]),
      "in_proj" ([heads*hd, dim] -> [dim, heads, hd]), "in_bias" ([heads*hd] -> [heads, hd]),
      "out_proj" ([dim, heads*hd] -> [heads, hd, dim]), "patch" (Conv2d [dim, C, ph, pw] ->
      Dense [ph*pw*C, dim]), "squeeze" (leading size-1 dims dropped), "scalar" ([1] -> 0-d).
    heads: the head count of the three attention kinds.
    expert: >= 0 when the HF tensor is expert `expert`'s slice of a stacked mmjax param (MoE:
      the rules of one path, experts 0..E-1, make one [E, ...] param); `mmjax_shape` is then
      the slice's shape.
    """

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    kind: str
    heads: int = 0
    expert: int = -1

    def __post_init__(self):
        if self.kind not in _LAYOUTS:
            raise ValueError(f"rule {self.hf_name}: unknown kind {self.kind!r}; "
                             f"kinds: {', '.join(LAYOUT_KINDS)}")
        if self.kind in _HEADED and self.heads <= 0:
            raise ValueError(f"rule {self.hf_name}: kind {self.kind!r} needs heads > 0")

    @property
    def mmjax_shape(self) -> tuple[int, ...]:
        return tuple(_LAYOUTS[self.kind][0](tuple(self.hf_shape), self.heads))

    def to_mmjax(self, w: np.ndarray) -> np.ndarray:
        return _LAYOUTS[self.kind][1](w, self)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        return _LAYOUTS[self.kind][2](w, self)

    def under(self, prefix: str) -> "TensorRule":
        """This rule with its mmjax path moved under `prefix` (a tower inside a bigger model)."""
        return dataclasses.replace(self, path=(prefix,) + self.path)


def _check_rule_table(rules: Sequence[TensorRule]) -> None:
    names, paths = set(), set()
    for r in rules:
        key = (r.path, r.expert)
        if r.hf_name in names or key in paths:
            twice = r.hf_name if r.hf_name in names else "/".join(r.path)
            raise ValueError(f"rule table names {twice} twice")
        names.add(r.hf_name)
        paths.add(key)


def apply_rules_from_hf(tensors: Mapping[str, np.ndarray], rules: Sequence[TensorRule],
                        what: str = "checkpoint", derived: Iterable[str] = ()) -> dict[str, Any]:
    """Nested mmjax params (float32 numpy) from HF `tensors` by `rules`.

    Tensors whose names end with one of `derived` (buffers computed from the config, e.g.
    `rotary_emb.inv_freq`, `embeddings.position_ids`) are skipped. InputError names missing
    tensors, unexpected tensors and shape mismatches (`what` names the source).
    """
    _check_rule_table(rules)
    derived = tuple(derived)
    expected = {r.hf_name for r in rules}
    missing = [r.hf_name for r in rules if r.hf_name not in tensors]
    extra = sorted(k for k in tensors if k not in expected and not (derived and k.endswith(derived)))
    if missing:
        raise InputError(f"{what} lacks {len(missing)} tensor(s) the config needs: {short_list(missing)}")
    if extra:
        raise InputError(f"{what} has {len(extra)} unexpected tensor(s): {short_list(extra)}")
    params: dict[str, Any] = {}
    stacks: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for r in rules:
        w = tensors[r.hf_name]
        if tuple(w.shape) != tuple(r.hf_shape):
            raise InputError(f"tensor {r.hf_name}: shape {tuple(w.shape)} in the {what}, but the "
                             f"config needs {tuple(r.hf_shape)}")
        # (reshape: np.ascontiguousarray turns a 0-d array such as CLIP's logit_scale into 1-d)
        value = np.ascontiguousarray(r.to_mmjax(np.asarray(w, np.float32))).reshape(r.mmjax_shape)
        if r.expert >= 0:
            stacks.setdefault(r.path, {})[r.expert] = value
        else:
            set_path(params, r.path, value)
    for path, slices in stacks.items():  # MoE: one [experts, ...] param from per-expert tensors
        set_path(params, path, np.stack([slices[j] for j in sorted(slices)]))
    return params


def apply_rules_to_hf(params: Mapping[str, Any], rules: Sequence[TensorRule]) -> dict[str, np.ndarray]:
    """HF tensors {name: float32 array} from plain nested mmjax params by `rules`; InputError
    names missing, unexpected and wrongly shaped params."""
    _check_rule_table(rules)
    leaves = dict(flatten(params))
    expected = {r.path for r in rules}
    missing = list(dict.fromkeys("/".join(r.path) for r in rules if r.path not in leaves))
    extra = sorted("/".join(p) for p in leaves if p not in expected)
    if missing:
        raise InputError(f"params lack {len(missing)} entr(ies) the config needs: {short_list(missing)}")
    if extra:
        raise InputError(f"params have {len(extra)} unexpected entr(ies): {short_list(extra)}")
    experts: dict[tuple[str, ...], int] = {}
    for r in rules:
        if r.expert >= 0:
            experts[r.path] = max(experts.get(r.path, 0), r.expert + 1)
    out = {}
    for r in rules:
        w = np.asarray(leaves[r.path], np.float32)
        want = r.mmjax_shape if r.expert < 0 else (experts[r.path],) + r.mmjax_shape
        if tuple(w.shape) != want:
            raise InputError(f"param {'/'.join(r.path)}: shape {tuple(w.shape)}, but the config needs "
                             f"{want}")
        out[r.hf_name] = np.ascontiguousarray(r.to_hf(w if r.expert < 0 else w[r.expert])).reshape(r.hf_shape)
    return out


def split_rows(tensors: Mapping[str, np.ndarray],
               fused: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """`tensors` with each present `fused` tensor split along its first dimension into equal
    parts named `fused[name]` (e.g. `in_proj_weight [3d, d]` -> q/k/v `[d, d]`), so that plain
    rules can name the parts."""
    out = {}
    for name, w in tensors.items():
        parts = fused.get(name)
        if parts is None:
            out[name] = w
            continue
        if w.ndim == 0 or w.shape[0] % len(parts):
            raise InputError(f"tensor {name}: first dimension {w.shape[0] if w.ndim else None} is not "
                             f"{len(parts)} x dim")
        out.update(zip(parts, np.split(w, len(parts), axis=0)))
    return out


def join_rows(tensors: Mapping[str, np.ndarray],
              fused: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """The inverse of `split_rows`: the parts concatenated back under their fused name."""
    out = dict(tensors)
    for name, parts in fused.items():
        if all(p in out for p in parts):
            out[name] = np.concatenate([out.pop(p) for p in parts], axis=0)
    return out


def strip_prefix(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """`tensors` with `prefix` removed from every name when all names carry it (checkpoints of
    stand-alone towers written by older transformers versions nest them under e.g.
    `vision_model.`; transformers 5 writes them without)."""
    if tensors and all(k.startswith(prefix) for k in tensors):
        return {k[len(prefix):]: v for k, v in tensors.items()}
    return dict(tensors)


# --- config helpers -------------------------------------------------------------------------

# HF hidden_act -> mmjax activation name (mmjax.nn.mlp.ACTIVATIONS), and back
ACTIVATIONS_FROM_HF = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh", "relu": "relu", "quick_gelu": "quick_gelu",
}
ACTIVATIONS_TO_HF = {
    "silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu",
    "quick_gelu": "quick_gelu",
}

# bookkeeping keys of any transformers config: they do not change the function computed
HARMLESS_KEYS = frozenset({
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "_name_or_path",
    "_attn_implementation", "_attn_implementation_autoset",
})


def check_config_keys(hf: Mapping[str, Any], known: Iterable[str], what: str,
                      bookkeeping: Iterable[str] = HARMLESS_KEYS) -> None:
    """UnsupportedModelError naming every key of `hf` outside `known` | `bookkeeping`, each
    with its closest known key ("did you mean ...")."""
    known = set(known) | set(bookkeeping)
    unknown = [k for k in hf if k not in known]
    if unknown:
        hints = "; ".join(f"{k!r}{closest_name(k, known)}" for k in unknown)
        raise UnsupportedModelError(
            f"{what}: unsupported key(s) {hints} (mmjax maps every key it accepts; an unknown "
            "one could change the model)"
        )


def activation_from_hf(act: Any, key: str = "hidden_act") -> str:
    """The mmjax activation of HF `act` (the value of config key `key`)."""
    if not isinstance(act, str) or act not in ACTIVATIONS_FROM_HF:
        raise UnsupportedModelError(f"{key} {act!r} is not supported; supported: "
                                    f"{', '.join(ACTIVATIONS_FROM_HF)}")
    return ACTIVATIONS_FROM_HF[act]


def activation_to_hf(act: str) -> str:
    """The HF `hidden_act` of mmjax activation `act`."""
    if act not in ACTIVATIONS_TO_HF:
        raise UnsupportedModelError(f"activation {act!r} has no Hugging Face hidden_act")
    return ACTIVATIONS_TO_HF[act]


def check_dropout(hf: Mapping[str, Any], *keys: str) -> None:
    """Dropout rates (absent, null or a number >= 0) are accepted: dropout acts only in
    training, the converted model computes the HF model in `eval()` mode."""
    for key in keys:
        value = hf.get(key, 0.0)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value < 0):
            raise UnsupportedModelError(f"{key} must be a number >= 0, got {value!r}")


def check_bool(hf: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = hf.get(key, default)
    if not isinstance(value, bool):
        raise UnsupportedModelError(f"{key} must be true or false, got {value!r}")
    return value


def int_or_none(value: Any, key: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise UnsupportedModelError(f"{key} must be one int or null, got {value!r}")


def architecture_of(hf: Mapping[str, Any], default: str) -> str:
    """The one entry of `architectures` (`default` when absent)."""
    archs = hf.get("architectures") or [default]
    if isinstance(archs, str):
        archs = [archs]
    if len(archs) != 1:
        raise UnsupportedModelError(f"config.json lists {len(archs)} architectures {archs}; expected one")
    return archs[0]


def check_model_type(hf: Mapping[str, Any], model_types: str | Sequence[str], what: str) -> str:
    """`hf`'s model_type; UnsupportedModelError unless it is one of `model_types` (those the
    `what` converter handles)."""
    model_types = (model_types,) if isinstance(model_types, str) else tuple(model_types)
    model_type = hf.get("model_type")
    if model_type not in model_types:
        raise UnsupportedModelError(f"model_type {model_type!r} is not handled by the {what} converter; "
                                    f"supported: {', '.join(model_types)}")
    return model_type


def check_architecture(hf: Mapping[str, Any], architectures: Sequence[str]) -> str:
    """`hf`'s one architecture (the first of `architectures` when absent); UnsupportedModelError
    unless it is among `architectures`."""
    arch = architecture_of(hf, architectures[0])
    if arch not in architectures:
        raise UnsupportedModelError(f"architecture {arch!r} is not supported for model_type "
                                    f"{hf.get('model_type')!r}; supported: {', '.join(architectures)}")
    return arch


def sub_config(hf: Mapping[str, Any], key: str, model_type: str, what: str) -> Mapping[str, Any]:
    """The nested config `hf[key]` (e.g. `text_config`), whose model_type must be `model_type`."""
    sub = hf.get(key) or {}
    if not isinstance(sub, Mapping):
        raise UnsupportedModelError(f"{what}: {key} must be an object, got {sub!r}")
    if sub.get("model_type", model_type) != model_type:
        raise UnsupportedModelError(f"{what}: {key}.model_type is {sub['model_type']!r}, "
                                    f"expected {model_type!r}")
    return sub


def build_config(cls: type, kw: Mapping[str, Any], what: str) -> Any:
    """`cls(**kw)`, its validation errors raised as UnsupportedModelError prefixed by `what`."""
    try:
        return cls(**kw)
    except (ConfigError, TypeError, ValueError) as e:
        raise UnsupportedModelError(f"{what}: {e}") from None


def tuple_sizes(kw: dict[str, Any], *keys: str) -> None:
    """JSON lists (e.g. `image_size: [224, 160]`) -> tuples, in place."""
    for key in keys:
        if isinstance(kw.get(key), list):
            kw[key] = tuple(kw[key])


def size_to_hf(size: Any) -> Any:
    return list(size) if isinstance(size, tuple) else size


def stamp_version(hf: dict[str, Any]) -> dict[str, Any]:
    """`hf` with `transformers_version` set to the installed transformers (when there is one)."""
    try:
        hf["transformers_version"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        pass
    return hf
