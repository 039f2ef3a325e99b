"""Checks that the judge servers a config names answer, in a format we parse.

  python -m prefgrpo_jax.judge_check --config=configs/flux.py \
      --config.reward.options.vlm_judge.base_url=http://HOST:8080 \
      --config.eval.unigenbench_dir=/data/UniGenBench --config.eval.vlm_judge.base_url=http://HOST:8081

Run it before a pod spends an hour sampling. For each server the config uses
(the pairwise reward judge when ``reward.spec`` has ``vlm_judge``; the eval
judge when ``eval.judge`` is ``vlm_judge`` or ``unigenbench``) it reports the
served models (``GET /v1/models``), sends one real request (an image pair
with the training client; a testpoint request with the eval client), its
latency and whether the reply parses. It exits with status 1 and a line
saying what to fix when any check fails.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any, Callable

import numpy as np

from prefgrpo_jax import config as config_lib

log = logging.getLogger(__name__)

# A caption and two images that differ in how well they match it.
CAPTION = "a red square on a white background"
SIZE = 256


def _check_images() -> np.ndarray:
    """``[2, SIZE, SIZE, 3]`` in [0, 1]: a red square, and a blue disc, on white."""
    images = np.ones((2, SIZE, SIZE, 3), np.float32)
    lo, hi = SIZE // 4, 3 * SIZE // 4
    images[0, lo:hi, lo:hi] = (0.9, 0.1, 0.1)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images[1][(yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (SIZE / 4) ** 2] = (0.1, 0.2, 0.9)
    return images


@dataclasses.dataclass
class Check:
    """One server's result: ``ok``, what was seen (``lines``) and, when not ok, the ``fix``."""

    name: str
    ok: bool = True
    lines: list[str] = dataclasses.field(default_factory=list)
    fix: str = ""

    def fail(self, fix: str) -> None:
        self.ok = False
        self.fix = self.fix or fix

    def report(self) -> str:
        head = f"[{'ok' if self.ok else 'FAIL'}] {self.name}"
        return "\n".join([head] + [f"    {line}" for line in self.lines]
                         + ([f"    fix: {self.fix}"] if self.fix else []))


class _Replies(logging.Handler):
    """Collects the judge client's warnings (failure reasons, unparseable reply tails)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _transport_fix(reason: str, field: str, base_url: str) -> str:
    """What to do about a failed request, from its reason."""
    if "HTTP 404" in reason:
        return (f"{base_url} answered 404: {field}.base_url must be the server root without /v1 "
                f"(requests go to {base_url}/v1/chat/completions) of an OpenAI-compatible server such "
                f"as `vllm serve`, and {field}.model a model it serves")
    if "HTTP 401" in reason or "HTTP 403" in reason:
        return f"the server refused the credentials: set {field}.api_key_env to the variable holding its key"
    if "malformed" in reason:
        return (f"{base_url} did not answer with OpenAI chat-completion JSON: point {field}.base_url at "
                "the vLLM server (README 'Judge servers')")
    return (f"start the judge server (README 'Judge servers') or fix {field}.base_url={base_url!r}; "
            f"the request failed with: {reason}")


def _check_server(name: str, field: str, options: dict[str, Any],
                  request: Callable[[Any, Check], None]) -> Check:
    """Models list, then ``request(judge, check)`` (one real request) with latency."""
    from prefgrpo_jax.rewards.judge import VLMJudge

    check = Check(f"{name}: {options.get('base_url')} model {options.get('model')!r}")
    try:
        judge = VLMJudge(**options)
    except ValueError as err:
        check.lines.append(f"cannot build the client: {err}")
        check.fail(f"fix the {field} settings")
        return check
    with judge:
        try:
            models = judge.served_models()
        except RuntimeError as err:
            check.lines.append(f"GET /v1/models failed: {err}")
            check.fail(_transport_fix(str(err), field, judge.base_url))
            return check
        check.lines.append(f"served models: {models}")
        if judge.model not in models:
            check.fail(f"the server does not serve {judge.model!r}: set --config.{field}.model to one of "
                       f"{models}, or restart vLLM with --served-model-name {judge.model}")
            return check
        replies = _Replies()
        client_log = logging.getLogger("prefgrpo_jax")
        client_log.addHandler(replies)
        t0 = time.perf_counter()
        try:
            request(judge, check)
        finally:
            client_log.removeHandler(replies)
        check.lines.append(f"latency {time.perf_counter() - t0:.2f} s ({judge.stats.requests} request(s))")
        check.lines += [f"client: {m}" for m in replies.messages[-3:]]
        stats = judge.stats
        if stats.failed:
            reason = next((m for m in reversed(replies.messages) if "failed" in m), "request failed")
            check.fail(_transport_fix(reason, field, judge.base_url))
    return check


def _pairwise_request(judge, check: Check) -> None:
    from prefgrpo_jax.rewards.judge import JudgeUnavailableError

    try:
        matrix = judge.preference_matrix([CAPTION], _check_images()[None])
    except JudgeUnavailableError as err:
        check.lines.append(str(err))
        return  # counted as failed in the stats
    if judge.stats.unparseable:
        check.fail("the reply holds no verdict in the form <answer>Image 1 is better</answer>: serve "
                   "UnifiedReward-Think (README 'Judge servers'), or raise max_tokens if the reply is cut off")
    else:
        check.lines.append(f"pair request parsed: P(red square beats blue disc) = {matrix[0, 0, 1]:.1f}")


def _unigenbench_request(config: config_lib.RunConfig) -> Callable[[Any, Check], None]:
    from prefgrpo_jax import unigenbench

    protocol, items, _ = unigenbench.load_set(config.eval.unigenbench_dir, config.eval.unigenbench_set, limit=1)

    def request(judge, check: Check) -> None:
        item = items[0]
        result = unigenbench.judge_image(judge, protocol, item, _check_images()[0], "judge_check", max_retries=0)
        if result["result_json"] is not None:
            check.lines.append(f"testpoint request parsed: {len(item.testpoints)} scores "
                               f"{result['result_json']['score']} for {list(item.testpoints)}")
        elif result["output"] is not None:
            check.fail(f"the reply has no <analysis> and <score> lists of {len(item.testpoints)} elements: "
                       "serve the UniGenBench eval model (README 'Judge servers'), or raise "
                       "eval.vlm_judge.max_tokens if the reply is cut off")
    return request


def _testpoint_request(judge, check: Check) -> None:
    from prefgrpo_jax.rewards.judge import JudgeUnavailableError

    try:
        scores = judge.testpoint_scores([CAPTION], _check_images()[:1], [["Is there a red square?"]])
    except JudgeUnavailableError as err:
        check.lines.append(str(err))
        return  # counted as failed in the stats
    if np.isnan(scores[0]).any():
        check.fail("the reply has no `1: yes` / `1: no` line in <answer>: check the model behind "
                   "eval.vlm_judge.model, or raise eval.vlm_judge.max_tokens if the reply is cut off")
    else:
        check.lines.append(f"testpoint request parsed: {scores[0].tolist()}")


def check_reward_judge(config: config_lib.RunConfig) -> Check | None:
    """The pairwise reward judge's check, or None when ``reward.spec`` has no ``vlm_judge``."""
    if "vlm_judge" not in dict(config.reward.spec):
        return None
    options = dict(config.reward.options.get("vlm_judge", {}))
    options["retries"] = 0  # a check should fail fast, not back off
    return _check_server("reward judge (pairwise)", "reward.options.vlm_judge", options, _pairwise_request)


def check_eval_judge(config: config_lib.RunConfig) -> Check | None:
    """The eval judge's check, or None when ``eval.judge`` needs no server."""
    from prefgrpo_jax.evaluate import vlm_judge_options

    judge = config.eval.judge
    if judge not in ("vlm_judge", "unigenbench"):
        return None
    name = f"eval judge ({judge})"
    options = vlm_judge_options(config)
    options["retries"] = 0
    try:
        request = _unigenbench_request(config) if judge == "unigenbench" else _testpoint_request
    except ValueError as err:  # no usable UniGenBench folder: nothing to send
        check = Check(name)
        check.lines.append(str(err))
        check.fail("set --config.eval.unigenbench_dir to a clone of https://github.com/CodeGoat24/UniGenBench")
        return check
    return _check_server(name, "eval.vlm_judge", options, request)


def check_judges(config: config_lib.RunConfig) -> list[Check]:
    """One :class:`Check` per judge server the config uses (none for the toy world)."""
    return [c for c in (check_reward_judge(config), check_eval_judge(config)) if c is not None]


def main(argv) -> None:
    del argv
    from absl import flags

    # Typed, not validated: the servers are checked before the rest of the config is.
    config = config_lib.RunConfig.from_dict(flags.FLAGS.config)
    checks = check_judges(config)
    if not checks:
        print("the config uses no judge server (reward.spec has no vlm_judge; eval.judge is "
              f"{config.eval.judge!r}): nothing to check")
    for check in checks:
        print(check.report(), flush=True)
    if not all(c.ok for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    from absl import app
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/flux.py", "ml_collections config file.", lock_config=True)
    app.run(main)
