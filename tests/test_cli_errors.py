"""Command-line mistakes give one clear line, not a traceback."""

import subprocess
import sys

from train_helpers import REPO, env


def run(*args):
    return subprocess.run([sys.executable, "-m", "prefgrpo_jax.main", *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)


def test_misspelled_config_field_is_one_line_with_a_suggestion(tmp_path):
    proc = run("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.train.grup_size=4")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 3, proc.stderr
    assert lines[0].startswith("error: bad config override --config.train.grup_size:")
    assert 'Did you mean "group_size"' in lines[0]
    assert not (tmp_path / "checkpoints").exists()


def test_flux_judge_api_key_env_settable_from_the_command_line(tmp_path):
    proc = run("--config=configs/flux.py", f"--workdir={tmp_path}",
               "--config.reward.options.vlm_judge.api_key_env=JUDGE_API_KEY")
    # Parsing succeeds; the run stops at the next problem: the placeholder weights path.
    assert "Flags parsing error" not in proc.stderr and "bad config override" not in proc.stderr, proc.stderr[-2000:]
    assert "config.model.path='/path/to/FLUX.1-dev'" in proc.stderr
