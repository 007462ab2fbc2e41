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
  checkpoints_unreadable/  steps that failed verification, set aside by `mmjax train`

Verifying a step (`check_step_files`, used by `mmjax train`, `generate`, `export`, `check`):
Orbax's commit marker (`commit_success.txt`, written into the step's temporary directory just
before the rename that publishes it, and into every item) must be there, and when the step has
the manifest `mmjax train` writes after the save is committed (`mmjax_manifest.json`: size and
sha256 of every file of the step), every file must still match it. The manifest is what makes
a bit flip detectable at all: Orbax's zarr/OCDBT chunks carry no checksum of their own, and a
flipped bit in an uncompressed chunk reads back as a plausible wrong number. A step without a
manifest (written before there were manifests, or a run killed between the commit and the
manifest) is verified by reading it only. Reading every array and comparing the tree and shapes
with the model's are the callers' part (`load_workdir` here, `Checkpointer.restore_latest` in
`mmjax.train.checkpointing`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
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
WORKDIR_UNREADABLE_DIR = "checkpoints_unreadable"
STEP_MANIFEST = "mmjax_manifest.json"
COMMIT_MARKER = "commit_success.txt"  # Orbax's (orbax.checkpoint atomicity COMMIT_SUCCESS_FILE)

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


def _params_mismatch(manager: Any, step: int, target: Any) -> str | None:
    """Why the params of `step` do not fit `target`'s tree and shapes (None when they do)."""
    try:
        saved = manager.item_metadata(step)["params"]
    except Exception as e:  # noqa: BLE001
        return f"its metadata cannot be read ({one_line(e)})"
    saved = getattr(saved, "tree", saved)
    got = {jax.tree_util.keystr(p): tuple(m.shape)
           for p, m in jax.tree_util.tree_leaves_with_path(saved)}
    want = {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(target)}
    if got == want:
        return None
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    k = diff[0]
    return (f"it was written for a different model ({len(diff)} params differ, e.g. {k}: "
            f"{got.get(k, 'absent')} vs the workdir's model {want.get(k, 'absent')})")


def _saved_target(manager: Any, step: int) -> tuple[Any, str | None]:
    """ShapeDtypeStructs of the params as `step` stored them (a PEFT run's own tree)."""
    try:
        saved = manager.item_metadata(step)["params"]
    except Exception as e:  # noqa: BLE001
        return None, f"its metadata cannot be read ({one_line(e)})"
    saved = getattr(saved, "tree", saved)
    return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                                  saved), None


def _tree_mismatch(params: Any, target: Any) -> str | None:
    got = {jax.tree_util.keystr(p): tuple(x.shape)
           for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(target)}
    if got == want:
        return None
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    return (f"its params, with the PEFT method folded in ({PEFT_FILE}), do not fit the workdir's "
            f"model ({len(diff)} differ, e.g. {diff[0]}: {got.get(diff[0], 'absent')} vs "
            f"{want.get(diff[0], 'absent')})")


PEFT_FILE = "peft.json"  # a PEFT training run's method record (mmjax.train.peft)


def read_peft_record(workdir: str) -> dict[str, Any] | None:
    """The workdir's peft.json ({"method", "frozen_base_dtype", "lora": {...}}) or None."""
    path = os.path.join(workdir, PEFT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON ({e})") from None


def fold_peft(params: Any, record: Mapping[str, Any]) -> Any:
    """A PEFT run's params (`record` = its peft.json) as the plain float32 model: int8 kernels
    dequantized (`mmjax.nn.quant`), bfloat16 params back to float32, LoRA merged into its
    kernels (`kernel += scale * A.B`, `mmjax.nn.lora.merge`)."""
    import jax.numpy as jnp

    from mmjax.nn import lora, quant

    params = quant.dequantize_kernels(params)
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, jnp.float32) if x.dtype == jnp.bfloat16 else x, params)
    method = record.get("method")
    if method == "lora":
        params = lora.merge(params, lora.LoraConfig(**record["lora"]))
    elif method is not None:
        raise InputError(f"{PEFT_FILE}: the {method} method's params cannot be folded into the "
                         "plain model (only LoRA merges); load them with load_workdir(workdir, "
                         "fold=False) and run the model inside mmjax.nn.peft_methods."
                         "peft_method(cfg) with the config recorded in peft.json")
    return params


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


def load_workdir(workdir: str, fold: bool = True) -> tuple[Any, Any, Any]:
    """(module, config, params) of a training workdir's latest checkpoint.

    A PEFT run's workdir (`peft.json`, `mmjax.train.peft`) gives the plain float32 model with
    the method folded in (`fold_peft`: LoRA merged, int8 / bfloat16 frozen params back to
    float32); `fold=False` gives its params as trained (LoRA leaves, int8 kernels + scales).

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
    ckpt_dir = os.path.abspath(ckpt_dir)
    steps = checkpoint_steps(ckpt_dir)
    if not steps:
        raise InputError(f"{workdir!r} holds no checkpoint yet")
    manager = ocp.CheckpointManager(
        ckpt_dir,
        options=ocp.CheckpointManagerOptions(create=False),  # (read_only=True logs warnings)
        # every item named, though only params are read: Orbax warns about unnamed ones
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "train": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )
    target = abstract_params(family, module, config)
    peft = read_peft_record(workdir)
    bad: list[str] = []
    params = None
    try:
        # newest readable step first; a read-only command reports bad steps but moves nothing
        # (it holds no lock: a training run may own the workdir)
        for step in steps:
            reason = check_step_files(os.path.join(ckpt_dir, str(step)))
            step_target = target
            if reason is None and peft is not None:  # LoRA leaves, int8 / bf16 frozen params
                step_target, reason = _saved_target(manager, step)
            if reason is None:
                reason = _params_mismatch(manager, step, step_target)
            if reason is None:
                try:
                    args = ocp.args.Composite(params=ocp.args.StandardRestore(step_target))
                    params = manager.restore(step, args=args)["params"]
                except Exception as e:  # noqa: BLE001 - any storage/format failure
                    reason = f"its params cannot be read ({one_line(e)})"
            if reason is None and peft is not None and fold:
                params = fold_peft(params, peft)
                reason = _tree_mismatch(params, target)
                if reason is not None:
                    params = None
            if reason is None:
                break
            bad.append(f"step {step}: {reason}")
    finally:
        manager.close()
    if params is None:
        raise InputError(f"no readable checkpoint in {ckpt_dir}: " + "; ".join(bad))
    for line in bad:
        print(f"mmjax: warning: checkpoint {line}; using step {step} "
              f"(`mmjax check {workdir}` lists every step)", file=sys.stderr, flush=True)
    return module, config, params



def load_workdir_task_state(workdir: str) -> Any:
    """The task state (`Task.init_task_state`: I-JEPA's EMA target encoder, BLIP's momentum
    models, ...) of a training workdir's newest checkpoint whose params and train state both
    verify, as numpy arrays; None when the task keeps none. InputError when nothing is readable."""
    import orbax.checkpoint as ocp

    ckpt_dir = os.path.abspath(os.path.join(workdir, WORKDIR_CHECKPOINT_DIR))
    steps = checkpoint_steps(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    bad = []
    for step in steps:
        step_dir = os.path.join(ckpt_dir, str(step))
        reason = check_step_files(step_dir, items=("params", "train"))
        if reason is None:
            try:
                train = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "train"))
                return train.get("task_state") if hasattr(train, "get") else None
            except Exception as e:  # noqa: BLE001 - any storage/format failure
                reason = f"its train state cannot be read ({one_line(e)})"
        bad.append(f"step {step}: {reason}")
    raise InputError(f"no readable checkpoint in {ckpt_dir}" + (": " + "; ".join(bad) if bad else ""))

# --- step verification -------------------------------------------------------------------------

def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _step_files(step_dir: str) -> list[str]:
    out = []
    for d, _, files in os.walk(step_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(d, name), step_dir)
            if rel != STEP_MANIFEST:
                out.append(rel)
    return sorted(out)


def write_step_manifest(step_dir: str) -> None:
    """Record size and sha256 of every file of a committed step in `step_dir/mmjax_manifest.json`
    (atomically). Hashing runs at disk speed (~1 GB/s); the training loop calls it after the
    async save is committed, by the primary process only."""
    files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                   "sha256": _sha256(os.path.join(step_dir, rel))} for rel in _step_files(step_dir)}
    tmp = os.path.join(step_dir, f".{STEP_MANIFEST}.tmp")
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": files}, f)
    os.replace(tmp, os.path.join(step_dir, STEP_MANIFEST))


def check_step_files(step_dir: str, items: tuple[str, ...] = ("params",)) -> str | None:
    """Why the step in `step_dir` is unreadable judged by its files (commit markers of the step
    and of `items`, the manifest when there is one), or None when they are intact."""
    if not os.path.isdir(step_dir):
        return "its directory is missing"
    for where in ("", *items):
        if not os.path.isfile(os.path.join(step_dir, where, COMMIT_MARKER)):
            return (f"Orbax's commit marker {os.path.join(where, COMMIT_MARKER)} is missing "
                    "(the save never completed)")
    manifest = os.path.join(step_dir, STEP_MANIFEST)
    if not os.path.isfile(manifest):
        return None
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its manifest {STEP_MANIFEST} is unreadable ({type(e).__name__})"
    for rel, want in sorted(files.items()):
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"{rel} has {size} bytes, {want['size']} were written (truncated or overwritten)"
        if _sha256(path) != want["sha256"]:
            return f"{rel} no longer matches the sha256 written with it (its bytes changed)"
    return None


def checkpoint_steps(ckpt_dir: str) -> list[int]:
    """The committed steps in an Orbax CheckpointManager directory, newest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted((int(n) for n in os.listdir(ckpt_dir)
                   if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n))), reverse=True)


def one_line(exc: BaseException, limit: int = 240) -> str:
    """`Type: first line of the message`, cut to `limit` characters (Orbax and TensorStore
    errors run to many lines)."""
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."
