"""Test-wide settings: 8 simulated CPU devices, no network, CPU only."""

import os
import sys

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
