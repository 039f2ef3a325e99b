"""End-to-end faults on the tiny fixture run: SIGKILL anywhere, NaN streaks, a judge
without signal, config changes on resume. Each test runs the real entrypoint in
subprocesses; the session's persistent compilation cache (conftest.py) keeps the
restarts cheap."""

from __future__ import annotations

import signal
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from prefgrpo_jax.train_logging import tensorboard_steps
from test_judge import FakeJudgeServer
from test_train import clip_dir, comparable, test_config  # noqa: F401 (fixtures)
from train_helpers import REPO, env, main_command, metrics


def derived_config(base: Path, path: Path, body: str) -> Path:
    """A config file: ``base``'s get_config(), then ``body`` (indented code using ``c``)."""
    path.write_text(textwrap.dedent(f"""
        import importlib.util
        import numpy as np
        spec = importlib.util.spec_from_file_location("base_cfg", {str(base)!r})
        base = importlib.util.module_from_spec(spec); spec.loader.exec_module(base)

        def get_config():
            c = base.get_config()
        """) + textwrap.indent(textwrap.dedent(body), " " * 4) + "    return c\n")
    return path


def run(config: Path, workdir: Path, *extra: str, timeout: int = 600):
    return subprocess.run(main_command(config, workdir, *extra), cwd=REPO, env=env(1),
                          capture_output=True, text=True, timeout=timeout)


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# -- NaN streak, then a resume with a changed config -------------------------------------

BLIND_REWARD = """
import numpy as np
from prefgrpo_jax.rewards import registry

def blind(*, name="blind"):
    calls = [0]

    def fn(prompts, images):  # finite scores whatever the images (NaN ones included)
        calls[0] += 1
        return np.random.default_rng(calls[0]).uniform(size=(len(prompts), np.shape(images)[1]))

    return registry.pointwise_source(name, fn)

registry.register_reward("blind", blind, overwrite=True)
"""


@pytest.mark.slow
def test_nan_streak_writes_no_checkpoint_no_export_and_exits_nonzero(test_config, tmp_path):
    (tmp_path / "blind_reward.py").write_text(BLIND_REWARD)
    # Step 1's update is finite but moves every weight by ~1e30: from step 2 on every
    # forward pass overflows, every loss is NaN and every update is skipped.
    config = derived_config(test_config, tmp_path / "nan.py", f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import blind_reward  # noqa: F401 (registers "blind")
        c.reward.spec = {{"blind": 1.0}}
        c.reward.options = {{}}
        c.optim.learning_rate = 1e30
        c.train.updates_per_rollout = 1  # else step 1's second update is already NaN
        c.total_steps = 4
        c.checkpoint_every = 1
        c.image_every = 0
    """)
    work = tmp_path / "work"
    proc = run(config, work)
    assert proc.returncode != 0
    assert "NonFiniteError: 3 consecutive steps up to step 4 had non-finite" in proc.stderr, proc.stderr[-3000:]
    assert "nothing was checkpointed or exported during it" in proc.stderr
    assert "the last good checkpoint is step 1" in proc.stderr
    assert checkpoint_steps(work) == [1]  # none from inside the streak
    assert not (work / "export").exists()
    assert [r["skipped_nonfinite"] for r in metrics(work)] == [0.0, 1.0, 1.0, 1.0]

    # Resuming with experiment-changing fields is refused before anything runs.
    proc = run(config, work, "--config.train.group_size=2", "--config.optim.learning_rate=1e-4")
    assert proc.returncode != 0
    assert "train.group_size: 4 -> 2" in proc.stderr and "optim.learning_rate: 1e+30 -> 0.0001" in proc.stderr
    assert "--config.allow_config_change=True" in proc.stderr
    assert checkpoint_steps(work) == [1]


# -- a judge that never answers in format ------------------------------------------------


@pytest.mark.slow
def test_judge_without_signal_stops_the_run_and_its_counters_reach_the_metrics(test_config, tmp_path):
    server = FakeJudgeServer()
    server.script = lambda body, headers, index: "Both images look fine to me."  # no <answer>
    try:
        config = derived_config(test_config, tmp_path / "judge.py", f"""
            c.reward.spec = {{"vlm_judge": 1.0}}
            c.reward.options = {{"vlm_judge": {{"base_url": {server.url!r}, "model": "m",
                                               "timeout_s": 10.0, "retries": 0}}}}
            c.train.max_steps_without_signal = 2
            c.total_steps = 4
            c.image_every = 0
        """)
        work = tmp_path / "work"
        proc = run(config, work)
    finally:
        server.stop()
    assert proc.returncode != 0
    assert "NoRewardSignalError: reward source 'vlm_judge' gave every image of every group the same reward " \
           "for 2 consecutive steps" in proc.stderr
    assert "100% of pairs tied" in proc.stderr and "12 had no parseable verdict" in proc.stderr
    rows = metrics(work)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # 2 prompts x 6 pairs per step
        assert (r["vlm_judge/judge_requests"], r["vlm_judge/judge_unparseable"], r["vlm_judge/judge_failed"]) == (12, 12, 0)
        assert r["reward/vlm_judge/tie_frac"] == 1.0
    assert not (work / "export").exists()


# -- SIGKILL at random points -----------------------------------------------------------


def _kill_when(proc: subprocess.Popen, workdir: Path, kind: str, arg: float) -> bool:
    """SIGKILLs ``proc`` at the trigger; False if it exited first.

    kind "time": ``arg`` seconds after the start. "metrics": at the ``arg``-th growth
    of metrics.jsonl (mid-append or just after it). "checkpoint": when the ``arg``-th
    new orbax temporary checkpoint directory appears (during its write).
    """
    t0 = time.monotonic()
    seen_size = (workdir / "metrics.jsonl").stat().st_size if (workdir / "metrics.jsonl").exists() else 0
    ck = workdir / "checkpoints"
    # A temporary directory left by an earlier kill is not a new write.
    seen_tmp = {p.name for p in ck.iterdir() if "tmp" in p.name} if ck.is_dir() else set()
    events = 0
    while proc.poll() is None:
        if kind == "time":
            fire = time.monotonic() - t0 >= arg
        elif kind == "metrics":
            path = workdir / "metrics.jsonl"
            size = path.stat().st_size if path.exists() else 0
            if size != seen_size:  # a rewrite on resume shrinks it; an append grows it
                events += size > seen_size
                seen_size = size
            fire = events >= arg
        else:
            tmp = {p.name for p in ck.iterdir() if "tmp" in p.name} if ck.is_dir() else set()
            events += len(tmp - seen_tmp)
            seen_tmp |= tmp
            fire = events >= arg
        if fire:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    return False


@pytest.mark.slow
def test_sigkill_at_ten_random_points_matches_an_uninterrupted_run(test_config, tmp_path):
    # 12 steps: the first nine kills below advance the chain by about 9 steps at most
    # (a metrics kill by <= 2, its rows; a checkpoint kill by <= 1; a time kill by about
    # one, its span), so the last victim still has steps to be killed in. With 8 the
    # chain could reach the end first, a failure that depended on the machine's load.
    config = derived_config(test_config, tmp_path / "kill.py", """
        c.total_steps = 12
        c.checkpoint_every = 1
        c.image_every = 0
    """)
    reference = tmp_path / "reference"
    proc = run(config, reference)  # compiles, or loads what an earlier test compiled
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A start from the cache, as every restart below, times its start-up (imports,
    # loading, restore, tracing, cache loads) up to its first logged step: the span the
    # time kills are spread over. That is all it is for, so it is stopped there.
    timing = tmp_path / "timing"
    t0 = time.monotonic()
    with open(tmp_path / "timing.log", "w") as log:
        starter = subprocess.Popen(main_command(config, timing), cwd=REPO, env=env(1), stdout=log, stderr=log)
        assert _kill_when(starter, timing, "metrics", 1), f"the timing run exited early; log: {tmp_path / 'timing.log'}"
    t_first = time.monotonic() - t0

    work = tmp_path / "killed"
    rng = np.random.default_rng(12)
    kinds = ["time", "metrics", "checkpoint"] * 3 + ["checkpoint"]
    rng.shuffle(kinds)
    kills = []
    for kind in kinds:
        # Time kills land anywhere from start-up (imports, loading, restore) to the
        # victim's first step; the metrics and checkpoint kills land at the writes.
        arg = float(rng.uniform(0.1, 1.0) * t_first) if kind == "time" else int(rng.integers(1, 3))
        with open(tmp_path / "killed.log", "a") as log:
            victim = subprocess.Popen(main_command(config, work), cwd=REPO, env=env(1), stdout=log, stderr=log)
            killed = _kill_when(victim, work, kind, arg)
        assert killed, f"the run ended before kill {len(kills) + 1} ({kind} {arg}); log: {tmp_path / 'killed.log'}"
        kills.append((kind, arg, checkpoint_steps(work) if (work / "checkpoints").is_dir() else []))
    final = run(config, work)
    assert final.returncode == 0, final.stderr[-3000:]
    # The restarts ran executables loaded from the cache; the reference compiled its
    # own (or loaded them too): equal metrics either way.
    assert comparable(metrics(work)) == comparable(metrics(reference)), kills
    assert [r["step"] for r in metrics(work)] == list(range(1, 13))
    for tag, steps in tensorboard_steps(work / "tensorboard").items():
        assert steps == list(range(1, 13)), (tag, steps)
    assert (work / "export" / "transformer").is_dir()
    assert (work / ".lock").read_text() == ""  # released by the run that finished
