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
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from mmjax import checkpoint
from mmjax.errors import InputError
from mmjax.train.optimizer import path_str


def load_source_params(path: str) -> Any:
    """The param tree stored at `path` (training workdir, mmjax model dir or HF dir)."""
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


def _subtree(params: Any, prefix: str) -> Any:
    node = params
    for key in [k for k in prefix.split("/") if k]:
        if not isinstance(node, dict) or key not in node:
            have = ", ".join(sorted(node)) if isinstance(node, dict) else type(node).__name__
            raise InputError(f"init_from_prefix={prefix!r}: no {key!r} in the source params "
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


def describe(report: dict[str, list[str]], path: str, prefix: str) -> str:
    kept = report["kept"]
    shown = ", ".join(kept[:6]) + (" ..." if len(kept) > 6 else "")
    return (f"initialised {len(report['copied'])} params from {path}"
            + (f" [{prefix}]" if prefix else "")
            + (f"; {len(kept)} kept fresh: {shown}" if kept else ""))


def write_report(workdir: str, report: dict[str, list[str]], path: str, prefix: str) -> None:
    with open(os.path.join(workdir, "init_from.json"), "w") as f:
        json.dump({"init_from": path, "prefix": prefix, **report}, f, indent=2)
