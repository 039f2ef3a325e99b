"""Shared fixtures. Tests run on the CPU; no network, no downloads."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (tiny_tokenizers, fixtures)

# One persistent XLA compilation cache for the whole session, set in the
# environment so that every subprocess (training runs, probes, benchmark
# workers) inherits it: most of the slow tests' time is fresh interpreters
# re-compiling the same tiny programs. Entries are keyed on the lowered program
# (StableHLO), jaxlib version, backend, XLA_FLAGS, compile options and device
# topology, so a hit is the executable a fresh compile of the same program would
# give: a code change that changes a program misses. Programs with host
# callbacks are never written. The directory is new per session (nothing stale
# from an earlier checkout or jaxlib) and removed at its end.
_CACHE_VARS = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # the tiny programs compile in well under 1 s
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
_session_cache_dir: str | None = None


def pytest_configure(config):
    global _session_cache_dir
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # the caller's own cache: keep it
        return
    _session_cache_dir = tempfile.mkdtemp(prefix="prefgrpo_jax_test_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _session_cache_dir
    # Before any test imports JAX (no plugin does), so this process reads them too.
    for name, value in _CACHE_VARS.items():
        os.environ.setdefault(name, value)


def pytest_unconfigure(config):
    if _session_cache_dir is not None:
        shutil.rmtree(_session_cache_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A diffusers-format FLUX directory with tiny random weights (built once)."""
    from pipeline_fixture import save_tiny_flux_pipeline

    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux"))
