"""Runs the real entrypoint in subprocesses on the tiny pipeline fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "two blue squares", "a green triangle above a red square", "three yellow circles",
           "a large white square", "a blue circle left of a green circle"]


def write_test_config(path: Path, flux_dir: Path, clip_dir: Path, prompts_file: Path, **overrides) -> Path:
    """A config file: configs/tiny.py shrunk to the fixture, with a CLIP reward.

    The random fixture draws noise, on which the toy verifier gives every image
    0 (all ties, zero advantages); a random CLIP gives varied scores, so the
    updates are non-trivial and resume/sharding tests compare real changes.
    """
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    lines = [
        "import importlib.util",
        f"spec = importlib.util.spec_from_file_location('tiny', {str(REPO / 'configs' / 'tiny.py')!r})",
        "tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)",
        "def get_config():",
        "    c = tiny.get_config()",
        f"    c.model.path = {str(flux_dir)!r}",
        f"    c.data.prompts = {str(prompts_file)!r}",
        "    c.reward.spec = {'clip': 1.0}",
        "    c.reward.monitor = ''",
        f"    c.reward.options = {{'clip': {{'path': {str(clip_dir)!r}}}}}",
        "    c.total_steps = 4",
        "    c.checkpoint_every = 2",
        "    c.image_every = 2",
        "    c.train.prompts_per_step = 2",
        "    c.train.group_size = 4",
        "    c.train.num_steps = 4",
        "    c.train.timestep_fraction = 0.67",
        "    c.train.timestep_chunk = 2",
        "    c.train.max_sequence_length = 8",
        "    c.optim.learning_rate = 1e-3",
    ]
    lines += [f"    c.{k} = {v!r}" for k, v in overrides.items()]
    lines.append("    return c")
    path.write_text("\n".join(lines) + "\n")
    return path


def main_command(config: Path, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prefgrpo_jax.main", f"--config={config}", f"--workdir={workdir}", *extra]


def env(devices: int = 1) -> dict[str, str]:
    e = dict(os.environ)
    e["JAX_PLATFORMS"] = "cpu"
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return e


def run_main(config: Path, workdir: Path, *extra: str, devices: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        main_command(config, workdir, *extra), cwd=REPO, env=env(devices), capture_output=True,
        text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
