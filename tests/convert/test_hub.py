"""Hub ids (`org/name[@revision]`) wherever a Hugging Face directory is taken: `from_hf`,
`mmjax compare / convert` (`mmjax.convert.hf_io.resolve`).

The cache is laid out by huggingface_hub itself: `snapshot_download` fetches a tiny random LLaMA
from a local HTTP server that answers the Hub's API (repo info, file tree, resolve) for a
`save_pretrained` directory. Everything after that runs with the network path closed
(HF_HUB_OFFLINE), as on a Colab runtime that has the model cached.
"""

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402

import jax  # noqa: E402

from mmjax.convert import from_hf  # noqa: E402
from mmjax.convert.compare import compare  # noqa: E402
from mmjax.convert.hf_io import parse_hub_id  # noqa: E402
from mmjax.errors import InputError  # noqa: E402
from support import randomise_torch, xla_flags  # noqa: E402

REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class LocalHub:
    """The three Hub endpoints `snapshot_download` calls, serving local directories as model
    repos at one fixed commit."""

    def __init__(self, repos):
        repos = dict(repos)

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, body=b"", headers=()):
                self.send_response(code)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                path = self.path.split("?")[0]
                if m := re.match(r"^/api/models/([^/]+/[^/]+)/revision/[^/]+$", path):
                    if m[1] not in repos:
                        return self.reply(404, b"{}", [("X-Error-Code", "RepoNotFound")])
                    files = [{"rfilename": f} for f in sorted(os.listdir(repos[m[1]]))]
                    info = {"id": m[1], "sha": COMMIT, "siblings": files, "private": False}
                    return self.reply(200, json.dumps(info).encode(), [("Content-Type", "application/json")])
                if (m := re.match(r"^/api/models/([^/]+/[^/]+)/tree/[^/]+$", path)) and m[1] in repos:
                    root = repos[m[1]]
                    tree = [{"type": "file", "path": f, "size": os.path.getsize(os.path.join(root, f)),
                             "oid": _sha1(os.path.join(root, f))} for f in sorted(os.listdir(root))]
                    return self.reply(200, json.dumps(tree).encode(), [("Content-Type", "application/json")])
                if (m := re.match(r"^/([^/]+/[^/]+)/resolve/[^/]+/(.+)$", path)) and m[1] in repos:
                    file = os.path.join(repos[m[1]], m[2])
                    if not os.path.isfile(file):
                        return self.reply(404, b"", [("X-Error-Code", "EntryNotFound")])
                    with open(file, "rb") as f:
                        data = f.read()
                    return self.reply(200, data, [("X-Repo-Commit", COMMIT),
                                                  ("ETag", f'"{hashlib.sha256(data).hexdigest()}"')])
                self.reply(404, b"", [("X-Error-Code", "RepoNotFound")])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, monkeypatch):
        """Point huggingface_hub at this server (its endpoint and file-URL template are read
        from `constants` when a request is made)."""
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            self.url + "/{repo_id}/resolve/{revision}/{filename}")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _sha1(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    path = tmp_path_factory.mktemp("llama")
    randomise_torch(transformers.LlamaForCausalLM(config)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hub_cache(llama_dir, tmp_path_factory):
    """A huggingface_hub cache holding REPO, written by snapshot_download from LocalHub."""
    cache = str(tmp_path_factory.mktemp("hf_cache"))
    hub = LocalHub({REPO: llama_dir})
    try:
        with pytest.MonkeyPatch.context() as mp:
            hub.serve(mp)
            huggingface_hub.snapshot_download(REPO, cache_dir=cache)
    finally:
        hub.close()
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", hub_cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def test_hub_ids_are_told_apart_from_paths(tmp_path, monkeypatch):
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("a/b/c") is None and parse_hub_id("name") is None
    monkeypatch.chdir(tmp_path)
    os.makedirs("org/name")
    assert parse_hub_id("org/name") is None  # an existing directory always wins


def test_from_hf_by_hub_id_reads_the_cache_offline(offline, llama_dir):
    _, by_id = from_hf(REPO)
    _, by_dir = from_hf(llama_dir)
    _, by_commit = from_hf(f"{REPO}@{COMMIT}")
    for a, b, c in zip(jax.tree.leaves(by_id), jax.tree.leaves(by_dir), jax.tree.leaves(by_commit)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_init_from_a_hub_id(offline, llama_dir):
    from mmjax.train.pretrained import load_source_params

    for a, b in zip(jax.tree.leaves(load_source_params(REPO)), jax.tree.leaves(from_hf(llama_dir)[1])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="'tiny-org/absent' is not a local directory"):
        load_source_params("tiny-org/absent")


def test_compare_by_hub_id(offline):
    report = compare(REPO, batch=1, seq_len=5)
    assert report["passed"] and report["model_type"] == "llama"


def test_missing_id_is_one_clear_error(offline):
    with pytest.raises(InputError, match=r"'tiny-org/absent' is not a local directory and not in "
                                         r"the Hugging Face cache .*download=True"):
        from_hf("tiny-org/absent")
    with pytest.raises(InputError, match="HF_HUB_OFFLINE is set"):
        from_hf("tiny-org/absent", download=True)
    with pytest.raises(InputError, match="not in the Hugging Face cache"):
        from_hf(f"{REPO}@not-a-revision")


def test_download_only_when_asked(llama_dir, tmp_path, monkeypatch):
    hub = LocalHub({REPO: llama_dir})
    try:
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
        hub.serve(monkeypatch)
        with pytest.raises(InputError, match="not in the Hugging Face cache"):
            from_hf(REPO)  # online, but not asked: nothing is fetched
        assert not os.listdir(tmp_path)
        _, params = from_hf(REPO, download=True)
        assert os.path.isdir(tmp_path / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT)
        with pytest.raises(InputError, match="no such model on the Hub"):
            from_hf("tiny-org/absent", download=True)
    finally:
        hub.close()
    _, by_dir = from_hf(llama_dir)
    np.testing.assert_array_equal(jax.tree.leaves(params)[0], jax.tree.leaves(by_dir)[0])


def test_cli_convert_by_hub_id(hub_cache, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": hub_cache, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags()}
    out = tmp_path / "converted"
    p = subprocess.run([sys.executable, "-m", "mmjax", "convert", REPO, str(out)], env=env,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "model.json").is_file()
    p = subprocess.run([sys.executable, "-m", "mmjax", "convert", "tiny-org/absent", str(tmp_path / "x")],
                       env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "'tiny-org/absent' is not a local directory" in p.stderr and "--download" in p.stderr
