"""Shared fixtures. Tests run on the CPU; no network, no downloads."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (tiny_tokenizers, fixtures)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A diffusers-format FLUX directory with tiny random weights (built once)."""
    from pipeline_fixture import save_tiny_flux_pipeline

    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux"))
