"""Activations stay with their batch rows: the sampling loop gathers weights only."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import env

REPO = Path(__file__).resolve().parent.parent


def _probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "activation_probe.py"), mode],
                          env=env(devices=8), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _weight_shaped(shape, param_shapes) -> bool:
    """A whole parameter, or one layer of a stacked (scanned) one."""
    return any(tuple(shape) in (tuple(p), tuple(p[1:])) for p in param_shapes)


def _activation_moves(probe: dict) -> list:
    """Collective results shaped like token activations (a sequence-length dim), not weights."""
    lengths = {probe["seq"], probe["tokens"]}
    return [(op, shape) for op, shapes in probe["collectives"] for shape in shapes
            if len(shape) >= 2 and lengths & set(shape) and not _weight_shaped(shape, probe["param_shapes"])]


@pytest.mark.slow
def test_sampling_loop_gathers_parameters_only():
    pinned = _probe("constrained")
    assert not _activation_moves(pinned), _activation_moves(pinned)
    assert any(op == "all-gather" for op, _ in pinned["collectives"])  # the FSDP weight gathers
    # Without the constraints XLA moves token activations: the check can fail.
    assert _activation_moves(_probe("free"))
