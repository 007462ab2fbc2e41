"""Test-wide settings: 8 simulated CPU devices, no network, CPU only."""

import os
import sys

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
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
