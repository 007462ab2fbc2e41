"""The notebooks in colab/ run top to bottom (MMJAX_NOTEBOOK_MODE=smoke), open with the shared
set-up cell, and that cell's install path resolves (docs/colab.md)."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from support import ROOT, xla_flags  # noqa: E402
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

# CI runs every notebook with MMJAX_NOTEBOOK_MODE=smoke: the notebook's own smoke sizes (a model
# with fewer/narrower layers for a few steps, which compiles in a fraction of the time: compiling
# the params' init and the train step, not the steps, is most of a notebook's run); the tasks'
# metrics are tested through the same loop in tests/tasks.
NOTEBOOKS = [
    pytest.param("clip_digits.ipynb", "zero-shot accuracy on 359 held-out images", 1, id="clip"),
    pytest.param("llava_digits.ipynb", "ASSISTANT:", 1, id="llava"),
    pytest.param("blip2_digits.ipynb", "ITC picks the right caption for", 1, id="blip2"),
    pytest.param("minilm_retrieval.ipynb", "Question: How do context managers work?", 1, id="minilm"),
    pytest.param("flamingo_digits.ipynb", "4-shot accuracy on these 6", 1, id="flamingo"),
    pytest.param("lora_pydoc.ipynb", "A (merged LoRA model):", 1, id="lora"),
    pytest.param("sharded_training.ipynb", "the two presets' losses agree", 8, id="sharded"),
    pytest.param("ijepa_digits.ipynb", "I-JEPA features on 359 held-out canvases", 1, id="ijepa"),
]
# which experiment each notebook's SIZES configure
EXPERIMENTS = {"clip_digits.ipynb": "clip_digits.py", "llava_digits.ipynb": "llava_digits.py",
               "blip2_digits.ipynb": "blip2_digits_stage1.py", "flamingo_digits.ipynb": "flamingo_digits.py",
               "lora_pydoc.ipynb": "sft_pydoc.py", "sharded_training.ipynb": "llm_text.py",
               "ijepa_digits.ipynb": "ijepa_digits.py"}


@pytest.mark.parametrize("name, expected, devices", NOTEBOOKS)
def test_notebook_runs_and_renders_its_figure(name, expected, devices, tmp_path, monkeypatch):
    monkeypatch.setenv("MMJAX_NOTEBOOK_MODE", "smoke")
    monkeypatch.setenv("MMJAX_NOTEBOOK_WORKDIR", str(tmp_path / "wd"))
    # the kernel is a fresh process without the suite's 8-device simulation: the set-up cell
    # adds the notebook's own CPU_DEVICES
    monkeypatch.setenv("XLA_FLAGS", xla_flags())
    nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert expected in text
    # the set-up cell found mmjax (no install) and printed the devices
    assert "mode 'smoke'" in text and f"{devices} CPU device(s)" in text
    assert "pip install" not in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook's figure was not rendered"


def _code_cells(name):
    with open(os.path.join(ROOT, "colab", name), encoding="utf-8") as f:
        nb = json.load(f)
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def _setup_namespace():
    """The set-up cell's definitions, without running it (everything above `# ---- run ----`)."""
    with open(os.path.join(ROOT, "colab", "_setup_cell.py"), encoding="utf-8") as f:
        source = f.read()
    namespace = {}
    exec(compile(source.split("# ---- run ----")[0], "_setup_cell.py", "exec"), namespace)
    return namespace


def test_every_notebook_opens_with_the_set_up_cell_and_a_colab_badge():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "colab", "_sync_setup.py"), "--check"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    names = sorted(os.path.basename(f) for f in glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
    assert names == sorted(n.values[0] for n in NOTEBOOKS)  # every notebook is executed above
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for name in names:
        assert _code_cells(name)[0].startswith("# mmjax set-up"), name
        assert f"colab.research.google.com/github/mmjax/mmjax/blob/main/colab/{name}" in readme, (
            f"README has no Open-in-Colab link for {name}")


def test_each_mode_configures_its_experiment():
    """Every notebook's SIZES, in every mode, are overrides its experiment accepts (`full`
    cannot run here, with no accelerator: this checks at least its config keys and values)."""
    from mmjax.train.experiment import load_experiment

    for name, experiment in EXPERIMENTS.items():
        sizing = next(c for c in _code_cells(name) if "SIZES = {" in c)
        for mode in ("full", "short", "smoke"):
            namespace = {"MODE": mode, "ACCELERATOR": None}
            exec(sizing.split("\nWORKDIR =")[0], namespace)
            steps, overrides = namespace["SIZES"][mode]
            assert steps is None or steps > 0
            load_experiment(os.path.join(ROOT, "experiments", experiment), overrides)


def test_set_up_install_resolves_without_replacing_anything(tmp_path):
    """The set-up cell's install path: clone the repository (from this checkout, as Colab clones
    it from GitHub), then `pip install --dry-run` the very requirement the cell builds. In an
    environment that already has the stack, pip installs mmjax alone: nothing of the runtime is
    replaced or downgraded."""
    setup = _setup_namespace()
    assert setup["MMJAX_GIT"] == "https://github.com/mmjax/mmjax.git"
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        pyproject = f.read()
    for extra in ("colab", "tpu", "cuda12"):
        assert f"\n{extra} = [" in pyproject, f"pyproject.toml has no [{extra}] extra"
    checkout = tmp_path / "mmjax"
    if os.path.isdir(os.path.join(ROOT, ".git")):
        subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{ROOT}", str(checkout)],
                       check=True, timeout=120)
    else:  # a source tree without history: its files as they are
        shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(".venv", "workdirs"))
    assert setup["in_checkout"](str(checkout))
    requirement = setup["mmjax_requirement"](str(checkout), None)
    assert requirement == f"{checkout}[colab]"
    assert setup["mmjax_requirement"]("/content/mmjax", "tpu") == "/content/mmjax[colab,tpu]"
    report = tmp_path / "report.json"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report",
                        str(report), requirement], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    assert [i["metadata"]["name"] for i in installs] == ["mmjax"], [
        (i["metadata"]["name"], i["metadata"]["version"]) for i in installs]
