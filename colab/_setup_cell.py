# mmjax set-up: the same cell opens every notebook in colab/ (docs/colab.md; `python
# colab/_sync_setup.py` copies this file into them). It works in three places:
#   - a fresh Colab runtime: clones mmjax and pip-installs it with the extra for the accelerator
#     found (`jax[tpu]` on a TPU runtime, `jax[cuda12]` on a GPU one) plus `colab`; nothing is
#     pinned, so pip upgrades what is too old and downgrades nothing of Colab's own;
#   - a checkout where mmjax imports (pip install -e .): installs nothing;
#   - CI, which runs the notebook in a checkout with MMJAX_NOTEBOOK_MODE=smoke.
# MMJAX_NOTEBOOK_MODE, the one switch: "full" (the whole recipe in bf16 with the flash kernels:
# the default on TPU/GPU), "short" (a short run: the default on CPU), "smoke" (a tiny model for a
# few steps: what CI runs). Set it first, e.g. `%env MMJAX_NOTEBOOK_MODE=full`.
CPU_DEVICES = 1  # simulated CPU devices where there is no TPU/GPU (a mesh needs several)
import glob, importlib, os, shutil, subprocess, sys

MMJAX_GIT = os.environ.get("MMJAX_GIT", "https://github.com/mmjax/mmjax.git")
MODES = ("full", "short", "smoke")


def accelerator_extra():
    """The pyproject extra for this machine's accelerator, found without JAX: 'tpu', 'cuda12'
    or None (CPU)."""
    if (os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE")
            or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")):
        return "tpu"
    if shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0"):
        return "cuda12"
    return None


def mmjax_requirement(checkout, accelerator=None):
    """The pip requirement the set-up installs: the checkout with the `colab` extra and the
    accelerator's (what tests/cli/test_notebooks.py dry-runs)."""
    extras = ",".join(["colab"] + ([accelerator] if accelerator else []))
    return f"{checkout}[{extras}]"


def in_checkout(path="."):
    return os.path.isfile(os.path.join(path, "pyproject.toml")) and os.path.isdir(
        os.path.join(path, "experiments"))


def mmjax_setup(cpu_devices=1):
    """Install when needed, size the CPU platform, import JAX; returns (mode, accelerator)."""
    if os.path.basename(os.getcwd()) == "colab" and in_checkout(".."):
        os.chdir("..")  # the notebooks run from the repository root (they read experiments/)
    if not in_checkout() and in_checkout("mmjax"):
        os.chdir("mmjax")  # Colab after a restart: the clone of the first run
    try:
        import mmjax.kernels  # noqa: F401  (an installed mmjax, not a bare source tree)
        installed = True
    except ImportError:
        installed = False
        for name in [m for m in sys.modules if m == "mmjax" or m.startswith("mmjax.")]:
            del sys.modules[name]  # a bare source tree's half-import must not shadow the install
    if not in_checkout():  # a fresh runtime: the notebooks need the repository's experiments/
        subprocess.check_call(["git", "clone", "-q", "--depth", "1", MMJAX_GIT, "mmjax"])
        os.chdir("mmjax")
    if not installed:
        requirement = mmjax_requirement(os.getcwd(), accelerator_extra())
        print("pip install", requirement)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", requirement])
        importlib.invalidate_caches()
    flags = os.environ.get("XLA_FLAGS", "")
    if cpu_devices > 1 and "xla_force_host_platform_device_count" not in flags:
        # only the CPU platform reads it: a TPU/GPU runtime keeps its own devices
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}"
    import jax
    import mmjax

    accelerator = jax.default_backend() if jax.default_backend() in ("tpu", "gpu") else None
    mode = os.environ.get("MMJAX_NOTEBOOK_MODE") or ("full" if accelerator else "short")
    if mode not in MODES:
        raise ValueError(f"MMJAX_NOTEBOOK_MODE={mode!r}: use one of {', '.join(MODES)}")
    devices = jax.devices()
    print(f"mmjax {mmjax.__version__}, jax {jax.__version__}; mode {mode!r}; "
          f"{len(devices)} {devices[0].platform.upper()} device(s): {devices}")
    return mode, accelerator


# ---- run ----
MODE, ACCELERATOR = mmjax_setup(CPU_DEVICES)
