"""Context parallelism end to end: the LM trains on a seq=8 mesh with ring attention (the
`context` preset), `mmjax generate` decodes from that workdir, and the compiled step needs less
memory per device than full attention on one device."""

import importlib.util
import os

import jax
import pytest

from mmjax.textgen import generate_text
from mmjax.train import run

from support import LLM_TEXT, ROOT, tiny_overrides

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def test_train_on_seq8_with_ring_attention_then_generate(corpus, tmp_path):
    wd = str(tmp_path / "wd")
    m = run(LLM_TEXT, workdir=wd, steps=2, mesh="seq=8",
            overrides=tiny_overrides(corpus, **{"parallelism": "context", "data.seq_len": 64}))
    assert m["step"] == 2 and m["val_loss"] < 7.0
    import json

    assert json.load(open(os.path.join(wd, "mmjax_model.json")))["config"]["implementation"] == "ring"
    text = generate_text(wd, "The", max_new_tokens=6)[0]
    assert text.startswith("The")


def test_ring_step_needs_less_memory_per_device_than_full_attention():
    spec = importlib.util.spec_from_file_location("long_context", os.path.join(ROOT, "experiments", "long_context.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.MODEL = dict(dim=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64)
    (row,) = mod.measure_memory(contexts=(2048,))
    ring, one = row["ring_seq8"]["per_device_bytes"], row["one_device"]["per_device_bytes"]
    # full attention holds [heads, T, T] scores; ring holds [T/8, T/8] blocks per device
    assert one > 8 * ring, (one, ring)
