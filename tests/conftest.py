"""Test-wide settings: 8 simulated CPU devices, no network, CPU only."""

import os
import sys

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's LLVM backend at -O0 for every program the tests compile (subprocesses -- CLI runs, notebook
# kernels, multi-host processes -- inherit it through XLA_FLAGS). The tests' programs are tiny, so
# their run time is nothing beside their compile time, which -O0 about halves (a training test
# 50 s -> 27 s; docs/testing.md). The HLO, i.e. what mmjax builds, is the same; results can
# differ in the last bit from an -O3 build (float contraction/vectorisation), far inside every
# tolerance. MMJAX_TEST_XLA_O0=0 (or an explicit level in XLA_FLAGS) keeps XLA's default.
if (os.environ.get("MMJAX_TEST_XLA_O0", "1") != "0"
        and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]):
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a test that would train a full prerequisite run (mmjax.train.pipeline) fails instead
os.environ.setdefault("MMJAX_TRAIN_PREREQUISITES", "refuse")

# One persistent XLA compilation cache per test run, shared by the xdist workers and by the
# subprocesses they start (CLI runs, notebook kernels, multi-host processes inherit the
# environment): a program compiled by one test is loaded, not recompiled, by the next test that
# builds the same one. A fresh directory per run (keyed by xdist's run id), so nothing carries
# over between runs; programs that compile in under 0.3 s are not worth the disk round trip.
# MMJAX_TEST_COMPILE_CACHE=0 turns it off. A cache entry that cannot be read is recompiled (JAX
# warns, it does not fail).
if os.environ.get("MMJAX_TEST_COMPILE_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"mmjax-test-xla-cache-{_run}")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# shared helpers (tests/support.py) import as `support` from every test folder
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """60k characters of Python's bundled documentation: small enough to tokenize in a second."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics.values())[:60_000]
    path = tmp_path_factory.mktemp("corpus") / "pydoc_slice.txt"
    path.write_text(text)
    return str(path)



# --- xdist scheduling (`-n 2 --dist loadfile`, what CI runs) -------------------------------------
# xdist's loadfile hands out whole files ordered by their number of tests, so the files of a few
# long tests (the notebooks, the multi-host run) came last and one worker ran them alone at the
# end. Here the files known to be long go first, longest first (the many short files then fill in
# behind them, so both workers finish together), and the notebook tests, which share no fixture,
# are one unit each so the two workers split them. The seconds: the files' summed durations in a
# loaded full run at -O0 (2026-12-02, `--durations=0`, divided by its ~2.5x slowdown; the 40
# longest scopes, the Flamingo notebook added after that run estimated like BLIP-2's); a file not
# listed keeps xdist's order after the listed ones, so a stale table costs balance, never a test.
_NB = "tests/cli/test_notebooks.py::test_notebook_runs_and_renders_its_figure"
LONG_FIRST = {  # scope (a file, or one test of SPLIT_FILES) -> seconds
    "tests/tasks/test_blip_task.py": 77,
    "tests/kernels/test_flash_attention.py": 69,
    "tests/train/test_task_state.py": 51,
    "tests/models/test_flamingo.py": 50,
    "tests/train/test_train_resume.py": 48,
    "tests/parity/test_convert_vit_clip.py": 46,
    "tests/models/test_vit_clip.py": 45,
    "tests/parallel/test_parallel_presets.py": 44,
    "tests/parallel/test_multihost.py": 42,
    "tests/models/test_ijepa.py": 41,
    "tests/generate/test_generate.py": 40,
    "tests/nn/test_moe.py": 38,
    "tests/parallel/test_preset_two_towers.py": 36,
    "tests/nn/test_transformer.py": 35,
    "tests/parity/test_convert_blip.py": 33,
    "tests/models/test_blip2.py": 32,
    "tests/tasks/test_flamingo_task.py": 32,
    "tests/train/test_faults.py": 31,
    "tests/tasks/test_long_context.py": 30,
    "tests/train/test_pipeline.py": 30,
    "tests/tasks/test_image_tasks.py": 29,
    "tests/parallel/test_preset_flamingo.py": 29,
    "tests/models/test_vit_clip_stack.py": 28,
    f"{_NB}[blip2]": 28,
    f"{_NB}[flamingo]": 28,
    "tests/tasks/test_blip2_task.py": 27,
    "tests/models/test_opt.py": 26,
    "tests/generate/test_speculative.py": 24,
    "tests/parity/test_convert_flamingo.py": 24,
    "tests/test_rag.py": 23,
    "tests/train/test_train_errors.py": 22,
    "tests/parallel/test_parallel_resume.py": 22,
    f"{_NB}[llava]": 22,
    "tests/tasks/test_ijepa_task.py": 22,
    f"{_NB}[clip]": 21,
    "tests/train/test_train_step.py": 20,
    "tests/generate/test_beam_search.py": 20,
    "tests/eval/test_few_shot.py": 19,
    "tests/parity/test_convert_llama.py": 18,
    "tests/tasks/test_visual_sft.py": 18,
    "tests/ops/test_attention_op.py": 18,
    f"{_NB}[minilm]": 17,
}
SPLIT_FILES = ("tests/cli/test_notebooks.py",)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: no error where it is not installed
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFirstFileScheduling(LoadFileScheduling):
        _sorted = False

        def _split_scope(self, nodeid):
            scope = super()._split_scope(nodeid)
            return nodeid if scope in SPLIT_FILES else scope

        def _assign_work_unit(self, node):
            if not self._sorted:  # the first call: the work queue is complete, nothing handed out
                self._sorted = True
                units = sorted(self.workqueue.items(), key=lambda u: -LONG_FIRST.get(u[0], 0.0))
                self.workqueue.clear()
                self.workqueue.update(units)
            super()._assign_work_unit(node)

    return LongestFirstFileScheduling(config, log)
