"""The notebooks in colab/ run top to bottom (a short training run via MMJAX_NOTEBOOK_STEPS)."""

import json
import os

import pytest

from support import ROOT, xla_flags  # noqa: E402
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


# Smaller models for CI (MMJAX_NOTEBOOK_OVERRIDES, appended to the notebook's own overrides): every
# cell runs the same code on a model with fewer/narrower layers, which compiles in a fraction of
# the time (compiling the params' init and the train step, not the steps, is most of a notebook's
# run); the tasks' metrics are tested through the same loop in tests/tasks.
TINY_TOWER = {"dim": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64}
CLIP_CI = [f"model.{t}.{k}={v}" for t in ("vision", "text") for k, v in TINY_TOWER.items()] + [
    "model.projection_dim=16", "data.batch_size=64", "eval_at_start=False"]
LLAVA_CI = ["model.vision.num_layers=1", "model.text.num_layers=1"]
BLIP2_CI = ["model.vision.num_layers=1", "model.qformer.num_layers=1"]
FLAMINGO_CI = ["model.vision.num_layers=1", "model.text.num_layers=1"]
LORA_CI = ["model.num_layers=1", "model.dim=32", "model.mlp_dim=64"]


@pytest.mark.parametrize("name, steps, overrides, expected", [
    pytest.param("clip_digits.ipynb", 20, CLIP_CI, "zero-shot accuracy on 359 held-out images", id="clip"),
    pytest.param("llava_digits.ipynb", 30, LLAVA_CI, "ASSISTANT:", id="llava"),
    pytest.param("blip2_digits.ipynb", 20, BLIP2_CI, "ITC picks the right caption for", id="blip2"),
    pytest.param("minilm_retrieval.ipynb", 0, [], "Question: How do context managers work?", id="minilm"),
    pytest.param("flamingo_digits.ipynb", 20, FLAMINGO_CI, "4-shot accuracy on these 6", id="flamingo"),
    pytest.param("lora_pydoc.ipynb", 10, LORA_CI, "A (merged LoRA model):", id="lora"),
])
def test_notebook_runs_and_renders_its_figure(name, steps, overrides, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("MMJAX_NOTEBOOK_STEPS", str(steps))
    monkeypatch.setenv("MMJAX_NOTEBOOK_OVERRIDES", json.dumps(overrides))
    monkeypatch.setenv("MMJAX_NOTEBOOK_WORKDIR", str(tmp_path / "wd"))
    # the kernel is a fresh process: one CPU device is enough (no 8-device simulation)
    monkeypatch.setenv("XLA_FLAGS", xla_flags())
    nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert expected in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook's figure was not rendered"
