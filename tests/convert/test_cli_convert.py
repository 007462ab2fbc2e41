"""`mmjax compare / convert / export` through the real entry point (`python -m mmjax`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402
from support import xla_flags  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
ENV["XLA_FLAGS"] = xla_flags()  # one CPU device is enough for the CLI


def mmjax(*argv, timeout=240):
    return subprocess.run([sys.executable, "-m", "mmjax", *argv], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def one_error_line(p):
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    return lines[0]


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=6, max_position_embeddings=64,
    )
    model = transformers.MistralForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.08 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("mistral")
    model.save_pretrained(path)
    return path


def test_compare_json_passes(mistral_dir):
    p = mmjax("compare", str(mistral_dir), "--seq-len", "13", "--batch", "3", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["model_type"] == "mistral"
    assert report["passed"] is True
    assert report["tolerance"] == 1e-4
    assert 0 < report["max_abs_diff"] <= 1e-4  # two implementations never agree to the last bit
    assert set(report["diffs"]) >= {"logits", "hidden_states"}
    assert report["reference"].startswith("transformers ")
    assert report["inputs"]["left_padding_last_row"] > 0
    assert len(report["hidden_state_diffs"]) == 3  # embeddings + 2 layers (last one normed)


def test_compare_unsupported_architecture_exits_2(tmp_path):
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32))
    gpt2.save_pretrained(tmp_path / "gpt2")
    p = mmjax("compare", str(tmp_path / "gpt2"), "--json")
    assert p.returncode == 2
    line = one_error_line(p)
    assert "gpt2" in line and "llama" in line  # names the problem and what is supported


def test_compare_missing_dir_exits_2(tmp_path):
    missing = str(tmp_path / "does-not-exist")
    p = mmjax("compare", missing)
    assert p.returncode == 2
    assert missing in one_error_line(p)


def test_convert_then_export_gives_equal_tensors(mistral_dir, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf_out"
    p = mmjax("convert", str(mistral_dir), str(ckpt))
    assert p.returncode == 0, p.stderr[-2000:]
    assert (ckpt / "model.json").is_file() and (ckpt / "params").is_dir()
    p = mmjax("export", str(ckpt), str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    original = load_file(str(mistral_dir / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for key in original:
        assert np.array_equal(exported[key], original[key]), key
    cfg_in = json.loads((mistral_dir / "config.json").read_text())
    cfg_out = json.loads((out / "config.json").read_text())
    assert cfg_out == cfg_in  # still a Mistral with the same window


def test_export_of_a_non_checkpoint_exits_2(tmp_path):
    p = mmjax("export", str(tmp_path), str(tmp_path / "out"))
    assert p.returncode == 2
    assert "model.json" in one_error_line(p)
