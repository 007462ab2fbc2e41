"""Read and write Hugging Face checkpoint directories without PyTorch.

A directory written by `save_pretrained` holds `config.json` and the weights, either in one
`model.safetensors` or in shards listed by `model.safetensors.index.json`. Tensors are read
with `safetensors.numpy` and returned as float32 numpy arrays; bfloat16 tensors (which numpy
cannot name) are decoded from the file's raw bytes with `ml_dtypes` (exact: every bfloat16
value is a float32 value). `pytorch_model.bin` (pickle) checkpoints are not read.

Where a directory is expected, a Hugging Face Hub id (`org/name`, optionally `org/name@revision`)
is accepted too (`resolve`): it is looked up in `huggingface_hub`'s cache (`HF_HOME` /
`HF_HUB_CACHE`), and downloaded only when the caller asks (`download=True`, the CLI's
`--download`) and `HF_HUB_OFFLINE` is not set.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Mapping

import numpy as np

from mmjax.errors import InputError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# what a model directory needs from a Hub repo: configs, safetensors weights, tokenizer files
# (not pytorch_model.bin / tf_model.h5 / flax_model.msgpack, which mmjax does not read)
HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken")
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")

# safetensors dtype names -> numpy dtypes (BF16 is handled separately)
_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def parse_hub_id(path_or_id: str) -> tuple[str, str | None] | None:
    """(repo_id, revision or None) when `path_or_id` is shaped like a Hub id and is no existing
    path; None otherwise (a local path, or nothing Hub-like)."""
    if os.path.exists(path_or_id):
        return None
    m = _HUB_ID.match(path_or_id)
    return (m["repo"], m["revision"]) if m else None


def resolve(path_or_id: str, *, download: bool = False) -> str:
    """The local directory for a model directory or a Hub id (`org/name[@revision]`).

    An existing path, or a string that is not Hub-shaped, comes back unchanged (the readers then
    say what is wrong with it). A Hub id is found in the huggingface_hub cache without any
    network call; with `download=True` a model missing from the cache is fetched (configs,
    safetensors and tokenizer files only), unless `HF_HUB_OFFLINE=1`. Anything else is one
    InputError naming the id, the cache and what to do.
    """
    parsed = parse_hub_id(path_or_id)
    if parsed is None:
        return path_or_id
    repo_id, revision = parsed
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise InputError(f"{path_or_id!r} is not a directory; reading it as a Hugging Face Hub id "
                         "needs the huggingface_hub package (pip install huggingface_hub)") from None
    cache = constants.HF_HUB_CACHE
    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True,
                                                 allow_patterns=list(HUB_FILES))
    except errors.LocalEntryNotFoundError:
        pass
    where = f"{path_or_id!r} is not a local directory and not in the Hugging Face cache ({cache})"
    if not download:
        raise InputError(f"{where}; to fetch it from the Hub pass download=True "
                         "(CLI: --download), or give the directory it was saved to")
    if constants.HF_HUB_OFFLINE:
        raise InputError(f"{where}, and HF_HUB_OFFLINE is set, so it cannot be downloaded; "
                         "unset HF_HUB_OFFLINE to fetch it")
    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                 allow_patterns=list(HUB_FILES))
    except Exception as e:  # network errors (httpx, OSError), HfHubHTTPError and its kinds
        cause = e
        while cause is not None and not isinstance(
                cause, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, errors.RevisionNotFoundError):
            raise InputError(f"{repo_id!r} has no revision {revision!r} on the Hub") from None
        if isinstance(cause, errors.RepositoryNotFoundError):
            raise InputError(f"{repo_id!r}: no such model on the Hub ({constants.ENDPOINT}), or "
                             "it is private/gated and no token is set (hf auth login)") from None
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"{where}, and downloading it failed: {type(e).__name__}: "
                         f"{first_line}") from None


def read_config(hf_dir: str) -> dict[str, Any]:
    """The parsed `config.json` of `hf_dir`. InputError when the dir or file is missing or bad."""
    if not os.path.exists(hf_dir):
        raise InputError(f"Hugging Face directory {hf_dir!r} does not exist")
    if not os.path.isdir(hf_dir):
        raise InputError(f"{hf_dir!r} is not a directory (expected a save_pretrained directory)")
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise InputError(f"{hf_dir!r} has no {CONFIG_FILE} (expected a save_pretrained directory)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def weight_files(hf_dir: str) -> list[str]:
    """Paths of the safetensors files holding the weights of `hf_dir`."""
    single = os.path.join(hf_dir, WEIGHTS_FILE)
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{index}: unreadable shard index ({e})") from None
        files = sorted(set(weight_map.values()))
        paths = [os.path.join(hf_dir, name) for name in files]
        missing = [name for name, p in zip(files, paths) if not os.path.isfile(p)]
        if missing:
            raise InputError(f"{hf_dir!r}: shard(s) listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        return paths
    if any(os.path.isfile(os.path.join(hf_dir, name)) for name in PICKLE_FILES):
        raise InputError(
            f"{hf_dir!r} holds only pytorch_model.bin weights; mmjax reads safetensors only "
            "(re-save with save_pretrained(..., safe_serialization=True))"
        )
    raise InputError(f"{hf_dir!r} has no {WEIGHTS_FILE} or {INDEX_FILE}")


def read_weights(hf_dir: str) -> dict[str, np.ndarray]:
    """All tensors of `hf_dir` as float32 numpy arrays (integer/bool tensors keep their dtype)."""
    tensors: dict[str, np.ndarray] = {}
    for path in weight_files(hf_dir):
        for name, arr in read_safetensors(path).items():
            if name in tensors:
                raise InputError(f"{hf_dir!r}: tensor {name!r} appears in more than one shard")
            tensors[name] = arr
    return tensors


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """One safetensors file -> {name: array}; floating tensors become float32."""
    header, data_start = _read_header(path)
    needs_raw = any(isinstance(v, dict) and v.get("dtype") not in _NUMPY_DTYPES
                    for k, v in header.items() if k != "__metadata__")
    if not needs_raw:
        from safetensors.numpy import load_file

        try:
            raw = load_file(path)
        except Exception as e:  # noqa: BLE001 - a corrupt file becomes one clear error
            raise InputError(f"cannot read {path}: {e}") from None
        return {k: _to_float32(v) for k, v in raw.items()}
    return {name: _read_raw_tensor(path, name, info, data_start)
            for name, info in header.items() if name != "__metadata__"}


def _read_header(path: str) -> tuple[dict[str, Any], int]:
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError(f"header size {size} is implausible")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    return header, 8 + size


def _read_raw_tensor(path: str, name: str, info: Mapping[str, Any], data_start: int) -> np.ndarray:
    dtype_name = info.get("dtype")
    if dtype_name == "BF16":
        import ml_dtypes

        dtype = np.dtype(ml_dtypes.bfloat16)
    elif dtype_name in _NUMPY_DTYPES:
        dtype = np.dtype(_NUMPY_DTYPES[dtype_name])
    else:
        raise InputError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * dtype.itemsize:
        raise InputError(f"{path}: tensor {name!r} byte range does not match shape {shape} {dtype_name}")
    arr = np.fromfile(path, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)
    return _to_float32(arr)


def _to_float32(arr: np.ndarray) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return arr
    return np.asarray(arr, dtype=np.float32)


def write_hf_dir(out_dir: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """Write `config.json` and `model.safetensors` (one file; floating tensors as float32)."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
        f.write("\n")
    # (reshape: np.ascontiguousarray turns 0-d tensors, e.g. CLIP's logit_scale, into 1-d)
    arrays = {k: np.ascontiguousarray(_to_float32(np.asarray(v))).reshape(np.shape(v))
              for k, v in tensors.items()}
    save_file(arrays, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
