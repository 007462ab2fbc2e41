"""Start a run from pretrained weights: copy a checkpoint's params onto a fresh model.

    ExperimentConfig(init_from="workdirs/clip_digits", init_from_prefix="vision", ...)

`init_from` may be a training workdir (`mmjax_model.json` + `checkpoints/`: the latest step),
an mmjax model directory (`mmjax convert` output) or a Hugging Face directory
(`save_pretrained` output, converted on the fly). `init_from_prefix` picks a subtree of the
source ("vision": a CLIP's image tower for a ViT classifier; "" = the whole tree). Every param
of the new model whose path (relative to the prefix) exists in the source with the same shape is
copied; the others (a new classification head) keep their fresh initialisation. Copying
nothing, or a shape clash, is an error that names the paths; the report lists what was kept new.
Only a fresh run uses it: a resumed run restores its own checkpoint.

Several sources build one model from pretrained parts (LLaVA: a CLIP image tower and a
language model), each an `InitSource(path, prefix, into)` whose `into` names the subtree of the
new model it fills:

    ExperimentConfig(init_from=(InitSource("workdirs/clip_digits", "vision", "vision"),
                                InitSource("workdirs/llm_text", "", "language_model")), ...)

On the command line: `--set "init_from=({'path': 'wd', 'prefix': 'vision', 'into': 'vision'},)"`.
Two sources filling the same param are an error; a param no source fills keeps its fresh value.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from mmjax import checkpoint
from mmjax.errors import InputError
from mmjax.train.experiment import InitSource, init_sources  # noqa: F401 (re-exported)
from mmjax.train.optimizer import path_str


def load_source_params(path: str) -> Any:
    """The param tree stored at `path` (training workdir, mmjax model dir or HF dir), or at a
    Hub id `org/name[@revision]` in huggingface_hub's cache (a run never downloads: fetch it
    first with `mmjax convert ID OUT --download` or `from_hf(ID, download=True)`)."""
    from mmjax.convert.hf_io import parse_hub_id, resolve

    if parse_hub_id(path) is not None:
        path = resolve(path)  # InputError naming the id and the cache when it is not there
    if not os.path.isdir(path):
        raise InputError(f"init_from={path!r} is not a directory (train or convert that model "
                         "first, or --set init_from=None to start from scratch)")
    if checkpoint.is_workdir(path):
        _, _, params = checkpoint.load_workdir(path)
        return params
    if checkpoint.is_model_dir(path):
        _, _, params = checkpoint.load_model_dir(path)
        return params
    if os.path.isfile(os.path.join(path, "config.json")):
        from mmjax.convert import from_hf

        _, params = from_hf(path)
        return params
    raise InputError(f"init_from={path!r} is neither a training workdir (mmjax_model.json), an "
                     "mmjax model directory (model.json) nor a Hugging Face directory (config.json)")


def _subtree(params: Any, prefix: str, what: str = "init_from_prefix", whose: str = "source"
             ) -> Any:
    node = params
    for key in [k for k in prefix.split("/") if k]:
        if not hasattr(node, "keys") or key not in node:
            have = ", ".join(sorted(node)) if hasattr(node, "keys") else type(node).__name__
            raise InputError(f"{what}={prefix!r}: no {key!r} in the {whose} params "
                             f"(it has: {have})")
        node = node[key]
    return node


def overlay(target: Any, source: Any, prefix: str = "") -> tuple[Any, dict[str, list[str]]]:
    """`target` with every leaf that `source[prefix]` holds at the same path and shape replaced
    by the source's value (cast to the target dtype). Returns (params, report) with the report's
    "copied" and "kept" (fresh) path lists. A source saved with its layers looped loads into a
    model that scans them, and the other way round (`match_layer_layout`)."""
    from mmjax.nn.transformer import match_layer_layout

    tree = match_layer_layout(_subtree(source, prefix), target)
    src = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    report: dict[str, list[str]] = {"copied": [], "kept": []}
    clashes = []
    src.update(_quantized_sources(target, src))  # int8 frozen kernels (frozen_base_dtype="int8")

    def pick(path, leaf):
        name = path_str(path)
        value = src.get(name)
        if value is None:
            report["kept"].append(name)
            return leaf
        if tuple(np.shape(value)) != tuple(leaf.shape):
            clashes.append(f"{name}: source {tuple(np.shape(value))} vs model {tuple(leaf.shape)}")
            return leaf
        report["copied"].append(name)
        return jax.device_put(np.asarray(value).astype(leaf.dtype), leaf.sharding)

    out = jax.tree_util.tree_map_with_path(pick, target)
    if clashes:
        raise InputError(f"init_from: {len(clashes)} param(s) differ in shape: " + "; ".join(clashes[:6]))
    if not report["copied"]:
        raise InputError(f"init_from: no param of the model was found in the source under prefix "
                         f"{prefix!r}; source paths look like {sorted(src)[:4]}")
    return out, report


def _quantized_sources(target: Any, src: dict[str, Any]) -> dict[str, Any]:
    """For each int8 kernel of `target` with a `kernel_scale` beside it (`mmjax.nn.quant`) whose
    float kernel the source holds: the source kernel quantized, and its scale."""
    from mmjax.nn import quant

    flat = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    out = {}
    for name, scale in flat.items():
        if not name.endswith("/" + quant.SCALE):
            continue
        kname = name[: -len(quant.SCALE)] + "kernel"
        kernel, value = flat.get(kname), src.get(kname)
        if kernel is None or value is None or kernel.dtype != np.int8:
            continue
        if tuple(np.shape(value)) != tuple(kernel.shape):
            continue  # reported as a shape clash by overlay
        n_lead = quant.lead_dims(kernel.shape, scale.shape)
        q, s = quant.quantize(np.asarray(value, np.float32), n_lead,
                               kernel.ndim - len(scale.shape))
        out[kname], out[name] = np.asarray(q), np.asarray(s)
    return out


def overlay_sources(target: Any, sources: tuple[InitSource, ...], load=None
                    ) -> tuple[Any, dict[str, Any]]:
    """`target` with each source's params copied onto its `into` subtree (`overlay` per source).
    Returns (params, report): "copied"/"kept" over the whole model plus "sources" (each one's
    label and copied count)."""
    load = load or load_source_params
    params = target
    copied: list[str] = []
    per_source = []
    for src in sources:
        keys = [k for k in src.into.split("/") if k]
        sub = _subtree(params, src.into, "init_from into", "model's") if keys else params
        if keys and not hasattr(sub, "keys"):
            raise InputError(f"init_from into={src.into!r} is a single param, not a subtree")
        new_sub, report = overlay(sub, load(src.path), src.prefix)
        names = [("/".join(keys + [n]) if keys else n) for n in report["copied"]]
        copied += names
        per_source.append({"path": src.path, "prefix": src.prefix, "into": src.into,
                           "copied": len(names)})
        params = _replace_subtree(params, keys, new_sub)
    done = set(copied)
    kept = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]
            if path_str(p) not in done]
    return params, {"copied": copied, "kept": kept, "sources": per_source}


def _replace_subtree(tree: Any, keys: list[str], value: Any) -> Any:
    if not keys:
        return value
    if hasattr(tree, "unfreeze") or not isinstance(tree, dict):
        tree = dict(tree)
    out = dict(tree)
    out[keys[0]] = _replace_subtree(tree[keys[0]], keys[1:], value)
    return out


def describe(report: dict[str, Any], sources: tuple[InitSource, ...]) -> str:
    """One log line: how many params came from where, and which kept their fresh values."""
    kept = report["kept"]
    shown = ", ".join(kept[:6]) + (" ..." if len(kept) > 6 else "")
    where = "; ".join(f"{s['copied']} from {src.label()}"
                      for s, src in zip(report["sources"], sources))
    return (f"initialised {len(report['copied'])} params ({where})"
            + (f"; {len(kept)} kept fresh: {shown}" if kept else ""))


def write_report(workdir: str, report: dict[str, Any], sources: tuple[InitSource, ...]) -> None:
    """`init_from.json`: with one source `init_from` / `prefix` as before; `sources` lists all."""
    head: dict[str, Any] = {}
    if len(sources) == 1:
        head = {"init_from": sources[0].path, "prefix": sources[0].prefix}
    with open(os.path.join(workdir, "init_from.json"), "w") as f:
        json.dump({**head, **report}, f, indent=2)
