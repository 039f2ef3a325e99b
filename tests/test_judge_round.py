"""A step's judging group by group (JudgeRound): early groups, uint8 images, the step deadline."""

from __future__ import annotations

import time

import numpy as np
import pytest

from prefgrpo_jax.rewards.judge import encode_image_data_url, image_to_uint8
from test_judge import answer, brightness_judge, expected_matrix, graded_images, make_judge, prompt_of, server  # noqa: F401


def test_uint8_images_are_sent_as_the_float_ones_would_be():
    imgs, _ = graded_images(n=1, g=2, size=16)
    for fmt in ("jpeg", "png"):
        assert encode_image_data_url(imgs[0, 0], fmt) == encode_image_data_url(image_to_uint8(imgs[0, 0]), fmt)


def test_groups_are_judged_as_they_are_submitted(server):
    server.delay_s = 0.05
    judge = make_judge(server, max_concurrency=4)
    imgs, levels = graded_images(n=3, g=4)
    judging = judge.start_round(3, 4)
    judging.submit(0, "p0", image_to_uint8(imgs[0]))
    # Group 0 is judged before the others exist: its pairs do not wait for the batch.
    assert judging.wait([0])
    assert server.count == 6 and {prompt_of(b) for b in server.bodies} == {"p0"}
    for b in (1, 2):
        judging.submit(b, f"p{b}", image_to_uint8(imgs[b]))
    np.testing.assert_array_equal(judging.result(), expected_matrix(levels))
    stats = judge.stats
    assert (stats.requests, stats.late, stats.ties, stats.calls) == (18, 0, 0, 1)
    with pytest.raises(ValueError, match="already submitted"):
        judging.submit(1, "p1", imgs[1])


def test_step_deadline_turns_outstanding_pairs_into_counted_ties(server):
    def script(body, headers, index):
        if prompt_of(body) == "slow":
            server.release.wait(30)  # a hung judge: only the step deadline ends this
        return brightness_judge(body)

    server.script = script
    judge = make_judge(server, max_concurrency=8, timeout_s=30.0, step_deadline_s=1.0)
    imgs, levels = graded_images(n=2, g=3)
    t0 = time.monotonic()
    P = judge.preference_matrix(["fast", "slow"], imgs)
    took = time.monotonic() - t0
    assert took < 5.0, f"the round took {took:.1f} s past its 1 s deadline"
    np.testing.assert_array_equal(P[0], expected_matrix(levels)[0])
    np.testing.assert_array_equal(P[1], np.full((3, 3), 0.5, np.float32))
    stats = judge.stats
    assert (stats.late, stats.ties, stats.failed) == (3, 3, 0)


def test_deadline_wakes_a_retry_backoff_and_late_is_not_failed(server):
    server.script = lambda body, headers, index: (503, b"{}")
    judge = make_judge(server, retries=3, backoff_s=4.0, step_deadline_s=0.5)
    imgs, _ = graded_images(n=1, g=2)
    t0 = time.monotonic()
    P = judge.preference_matrix(["p"], imgs)
    assert time.monotonic() - t0 < 3.0  # not the 4 s backoff
    np.testing.assert_array_equal(P, np.full((1, 2, 2), 0.5, np.float32))
    stats = judge.stats
    # Late, not failed: a slow judge does not raise JudgeUnavailableError.
    assert (stats.requests, stats.retried, stats.failed, stats.late) == (1, 1, 0, 1)


def test_debias_in_a_round_scores_both_orders(server):
    server.script = lambda body, headers, index: answer(1)  # always prefers the first image shown
    judge = make_judge(server, debias=True)
    imgs, _ = graded_images(n=1, g=3)
    judging = judge.start_round(1, 3)
    judging.submit(0, "p", imgs[0])
    np.testing.assert_array_equal(judging.result(), np.full((1, 3, 3), 0.5, np.float32))
    assert server.count == 6


def test_matrix_of_early_groups_equals_the_rounds_result(server):
    judge = make_judge(server)
    imgs, levels = graded_images(n=3, g=3)
    judging = judge.start_round(3, 3)
    judging.submit(0, "p0", imgs[0])
    judging.submit(1, "p1", imgs[1])
    early = judging.matrix([0, 1])
    assert judging.done([0, 1]) and not judging.done([2])
    judging.submit(2, "p2", imgs[2])
    full = judging.result()
    np.testing.assert_array_equal(early, full[:2])
    np.testing.assert_array_equal(full, expected_matrix(levels))
