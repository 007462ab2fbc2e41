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

Training workdirs (written by `mmjax train`, `mmjax.train.loop`) are read here too, so that
`mmjax export` and the layers below `mmjax.train` can use a trained model:
    module, config, params = load_workdir("workdirs/llm_text")   # the latest checkpoint
Their layout, as far as reading a model goes:
  mmjax_model.json  {"family": ..., "config": {...}}
  checkpoints/      Orbax `CheckpointManager` steps; each step's "params" item holds the params
  tokenizer.model   the sentencepiece tokenizer of a text run (absent otherwise)
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

# Training workdir layout (mmjax.train.loop writes these; it re-exports them under the names
# MODEL_FILE, TOKENIZER_FILE and CHECKPOINT_DIR).
WORKDIR_MODEL_FILE = "mmjax_model.json"
WORKDIR_TOKENIZER_FILE = "tokenizer.model"
WORKDIR_CHECKPOINT_DIR = "checkpoints"

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
    from mmjax.errors import UnsupportedModelError
    from mmjax.models import abstract_params, example_inputs

    try:
        example_inputs(family, config)
    except UnsupportedModelError:  # a family without registered example inputs: not checked
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


def is_workdir(path: str) -> bool:
    """Whether `path` is a training workdir (it has `mmjax_model.json`)."""
    return os.path.isfile(os.path.join(path, WORKDIR_MODEL_FILE))


def read_workdir_info(workdir: str) -> dict[str, Any]:
    """The parsed `mmjax_model.json` ({"family", "config"}) of a training workdir.

    Raises InputError when `workdir` is not a training workdir.
    """
    model_file = os.path.join(workdir, WORKDIR_MODEL_FILE)
    if not os.path.isfile(model_file):
        raise InputError(f"{workdir!r} is not a training workdir (no {WORKDIR_MODEL_FILE})")
    with open(model_file) as f:
        return json.load(f)


def load_workdir(workdir: str) -> tuple[Any, Any, Any]:
    """(module, config, params) of a training workdir's latest checkpoint.

    The module is rebuilt for use outside the training mesh: an `implementation` that cannot
    decode or init there (ring) becomes the platform default (`decoding_implementation`); the
    params are the same. Raises InputError when `workdir` is not a training workdir or holds no
    checkpoint.
    """
    import orbax.checkpoint as ocp

    from mmjax.models import abstract_params, build_model
    from mmjax.ops.attention import decoding_implementation

    spec = read_workdir_info(workdir)
    family = spec.get("family")
    module, config = build_model(family, spec.get("config") or {})  # old keys: Config.RENAMED
    impl = getattr(config, "implementation", None)
    if decoding_implementation(impl) != impl:
        module, config = build_model(family, config.replace(implementation=decoding_implementation(impl)))
    ckpt_dir = os.path.join(workdir, WORKDIR_CHECKPOINT_DIR)
    if not os.path.isdir(ckpt_dir):
        raise InputError(f"{workdir!r} holds no checkpoint yet ({ckpt_dir} missing)")
    manager = ocp.CheckpointManager(
        os.path.abspath(ckpt_dir),
        options=ocp.CheckpointManagerOptions(create=False),  # (read_only=True logs warnings)
        item_handlers={"params": ocp.StandardCheckpointHandler()},
    )
    try:
        step = manager.latest_step()
        if step is None:
            raise InputError(f"{workdir!r} holds no checkpoint yet")
        restore = ocp.args.StandardRestore(abstract_params(family, module, config))
        params = manager.restore(step, args=ocp.args.Composite(params=restore))["params"]
    finally:
        manager.close()
    return module, config, params
