"""Self-describing model directories: Orbax params + `model.json` (family and config).

    save_model_dir("ckpt/llama", "llama", config, params)
    module, config, params = load_model_dir("ckpt/llama")

Layout of a model directory:
  model.json  {"format": "mmjax-model", "version": 1, "family": ..., "config": {...},
               "metadata": {...}}   (metadata: optional, e.g. the Hugging Face model_type)
  params/     an Orbax `StandardCheckpointer` checkpoint of the (unboxed) params

Saving is atomic: everything is written into a temporary directory next to `out_dir` and
renamed into place only when complete, so a failed or killed save never leaves `out_dir`
half-written, and an existing good `out_dir` stays intact until the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Mapping

import jax

from mmjax.errors import InputError

MODEL_FILE = "model.json"
PARAMS_DIR = "params"
FORMAT = "mmjax-model"
VERSION = 1

# family -> example inputs for `module.init`, used to check restored param shapes
def is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_FILE))


def save_model_dir(
    out_dir: str, family: str, config: Any, params: Any, *, metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write `params` of a `family` model with `config` (dataclass or dict) to `out_dir`.

    Replaces an existing mmjax model directory atomically; refuses to replace any other
    non-empty directory (InputError).
    """
    import flax.linen as nn
    import orbax.checkpoint as ocp

    from mmjax.models import build_model

    _, config = build_model(family, config)  # validates family and config
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise InputError(f"{out_dir!r} exists and is not a directory")
        if os.listdir(out_dir) and not is_model_dir(out_dir):
            raise InputError(f"{out_dir!r} exists, is not empty and is not an mmjax model directory; "
                             "refusing to replace it")
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    info = {"format": FORMAT, "version": VERSION, "family": family, "config": config.to_dict(),
            "metadata": dict(metadata or {})}
    plain = nn.meta.unbox(params)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, MODEL_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(os.path.join(tmp, PARAMS_DIR), plain)
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: str, target: str) -> None:
    """Move complete directory `new` to `target`, keeping the old `target` until it succeeds."""
    old = None
    if os.path.exists(target):
        old = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_model_info(path: str) -> dict[str, Any]:
    """The parsed `model.json` of a model directory (InputError when absent or malformed)."""
    if not os.path.isdir(path):
        raise InputError(f"mmjax model directory {path!r} does not exist")
    model_file = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(model_file):
        raise InputError(f"{path!r} is not an mmjax model directory (no {MODEL_FILE})")
    try:
        with open(model_file, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {model_file}: {e}") from None
    if not isinstance(info, dict) or "family" not in info or not isinstance(info.get("config"), dict):
        raise InputError(f"{model_file}: expected an object with 'family' and 'config'")
    return info


def load_model_dir(path: str) -> tuple[Any, Any, dict[str, Any]]:
    """(module, config, params) of a directory written by `save_model_dir`.

    params are plain jax arrays on the default device, checked against the shapes the config
    implies.
    """
    import orbax.checkpoint as ocp

    from mmjax.models import build_model

    info = read_model_info(path)
    module, config = build_model(info["family"], info["config"])
    params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
    if not os.path.isdir(params_dir):
        raise InputError(f"{path!r} has no {PARAMS_DIR}/ checkpoint")
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = checkpointer.metadata(params_dir)
        tree = getattr(stored, "item_metadata", stored)
        tree = getattr(tree, "tree", tree)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)
        params = checkpointer.restore(params_dir, target)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any storage/format failure becomes one clear error
        raise InputError(f"cannot restore params from {params_dir}: {type(e).__name__}: {e}") from None
    finally:
        checkpointer.close()
    _check_shapes(info["family"], module, config, params, params_dir)
    return module, config, params


def _check_shapes(family: str, module: Any, config: Any, params: Any, where: str) -> None:
    from mmjax.models import EXAMPLE_INPUTS, abstract_params

    if family not in EXAMPLE_INPUTS:
        return
    expected = abstract_params(family, module, config)
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise InputError(f"{where}: params do not match the config: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for name, shape in want.items():
        if got[name] != shape:
            raise InputError(f"{where}: param {name} has shape {got[name]}, the config needs {shape}")
