"""``python -m prefgrpo_jax.judge_check`` against fake judge servers: pass, and failures naming the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from prefgrpo_jax.judge_check import check_judges
from test_judge import MODEL, FakeJudgeServer, brightness_judge
from test_train import load_tiny_config
from test_unigenbench import UGB, asked_testpoints, needs_release, official_reply
from train_helpers import REPO, env


def both_judges(body, headers, index):
    """UniGenBench requests get the official format; pair requests the pairwise verdict."""
    if "<checkpoint>" in body["messages"][0]["content"][-1]["text"]:
        return official_reply(*asked_testpoints(body))
    return brightness_judge(body)


@pytest.fixture
def server():
    srv = FakeJudgeServer()
    srv.script = both_judges
    yield srv
    srv.stop()


def judged_config(url: str):
    """The tiny config with the pairwise reward judge and the UniGenBench eval judge at ``url``."""
    c = load_tiny_config()
    c.reward.spec = {"vlm_judge": 1.0}
    c.reward.options = {"vlm_judge": {"base_url": url, "model": MODEL, "timeout_s": 5.0}}
    c.eval.judge = "unigenbench"
    c.eval.unigenbench_dir = str(UGB)
    c.eval.vlm_judge.base_url = url
    c.eval.vlm_judge.model = MODEL
    c.eval.vlm_judge.timeout_s = 5.0
    return c


@needs_release
def test_both_judges_pass(server):
    checks = check_judges(judged_config(server.url))
    assert [c.ok for c in checks] == [True, True], "\n".join(c.report() for c in checks)
    pair, testpoints = (c.report() for c in checks)
    assert f"served models: ['{MODEL}']" in pair and "pair request parsed" in pair and "latency" in pair
    assert "testpoint request parsed: 3 scores" in testpoints  # row 0 of test_prompts_en.csv
    assert server.paths.count("/v1/chat/completions") == 2


@needs_release
@pytest.mark.parametrize("models_reply, post_reply, fix", [
    ((404, b'{"detail": "Not Found"}'), None, "must be the server root without /v1"),
    ((200, b"<html>garbage</html>"), None, "did not answer with OpenAI chat-completion JSON"),
    (None, (404, b'{"detail": "Not Found"}'), "must be the server root without /v1"),
    (None, (200, b"garbage"), "did not answer with OpenAI chat-completion JSON"),
    (None, "I like the first one.", "serve UnifiedReward-Think"),
    ((200, b'{"data": [{"id": "other-model"}]}'), None, "--served-model-name " + MODEL),
])
def test_failures_name_the_fix(server, models_reply, post_reply, fix):
    if models_reply is not None:
        server.models_reply = models_reply
    if post_reply is not None:
        server.script = lambda body, headers, index: post_reply
    checks = check_judges(judged_config(server.url))
    assert not checks[0].ok and fix in checks[0].fix, checks[0].report()


def test_unreachable_server_and_exit_status(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "config.py"
    config.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('tiny', {str(REPO / 'configs' / 'tiny.py')!r})\n"
        "tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)\n"
        "def get_config():\n"
        "    c = tiny.get_config()\n"
        "    c.reward.spec = {'vlm_judge': 1.0}\n"
        f"    c.reward.options = {{'vlm_judge': {{'base_url': 'http://127.0.0.1:{port}', 'model': 'm'}}}}\n"
        "    return c\n")
    proc = subprocess.run([sys.executable, "-m", "prefgrpo_jax.judge_check", f"--config={config}"],
                          cwd=REPO, env=env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[FAIL] reward judge (pairwise)" in proc.stdout
    assert "fix: start the judge server" in proc.stdout and "reward.options.vlm_judge.base_url" in proc.stdout


@pytest.mark.parametrize("reply, ok, fix", [
    ("<answer>1: yes</answer>", True, ""),
    ("<answer>looks fine</answer>", False, "no `1: yes` / `1: no` line"),
    ((404, b"{}"), False, "must be the server root without /v1"),
])
def test_yes_no_eval_judge(server, reply, ok, fix):
    server.script = lambda body, headers, index: reply
    c = load_tiny_config()
    c.eval.judge = "vlm_judge"
    c.eval.vlm_judge.base_url = server.url
    c.eval.vlm_judge.model = MODEL
    (check,) = check_judges(c)  # the toy reward needs no server
    assert check.ok == ok and fix in check.fix, check.report()
