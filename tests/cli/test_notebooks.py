"""The notebooks in colab/ run top to bottom (a short training run via MMJAX_NOTEBOOK_STEPS)."""

import os

import pytest

from support import ROOT  # noqa: E402
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


@pytest.mark.parametrize("name, steps, expected", [
    ("clip_digits.ipynb", 40, "zero-shot accuracy on 359 held-out images"),
    ("llava_digits.ipynb", 30, "ASSISTANT:"),
    ("blip2_digits.ipynb", 20, "ITC picks the right caption for"),
    ("minilm_retrieval.ipynb", 0, "Question: How do context managers work?"),
])
def test_notebook_runs_and_renders_its_figure(name, steps, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("MMJAX_NOTEBOOK_STEPS", str(steps))
    monkeypatch.setenv("MMJAX_NOTEBOOK_WORKDIR", str(tmp_path / "wd"))
    # the kernel is a fresh process: one CPU device is enough (no 8-device simulation)
    monkeypatch.setenv("XLA_FLAGS", "")
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
