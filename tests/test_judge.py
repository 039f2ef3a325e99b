"""Tests of the pairwise VLM judge client against a local scripted HTTP server."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from prefgrpo_jax.rewards.judge import (
    DEFAULT_PAIRWISE_PROMPT,
    JudgeStats,
    JudgeUnavailableError,
    VLMJudge,
    encode_image_data_url,
    parse_preference,
    parse_testpoints,
)

MODEL = "test-judge"


def answer(k: int) -> str:
    return f"<think>scores ... total</think><answer>Image {k} is better</answer>"


def decode_images(body: dict) -> list[np.ndarray]:
    out = []
    for part in body["messages"][0]["content"]:
        if part["type"] == "image_url":
            url = part["image_url"]["url"]
            assert url.startswith(("data:image/jpeg;base64,", "data:image/png;base64,"))
            raw = base64.b64decode(url.split(",", 1)[1])
            out.append(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
    return out


def prompt_of(body: dict) -> str:
    text = body["messages"][0]["content"][-1]["text"]
    return text.rsplit("Text Caption: [", 1)[1].rstrip("]")


def brightness_judge(body: dict) -> str:
    a, b = decode_images(body)
    return answer(1 if a.mean() > b.mean() else 2)


class FakeJudgeServer:
    """ThreadingHTTPServer whose replies come from ``self.script``.

    ``script(body, headers, index)`` returns either a str (the reply content,
    sent as a 200 chat completion) or ``(status, raw_body_bytes)``. It may
    block on ``self.release`` to simulate a hanging judge. ``GET /v1/models``
    answers ``models_reply`` (status, raw body): by default the model list [MODEL].
    """

    def __init__(self):
        self.script = lambda body, headers, index: brightness_judge(body)
        self.lock = threading.Lock()
        self.count = 0
        self.inflight = 0
        self.max_inflight = 0
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.paths: list[str] = []
        self.delay_s = 0.0
        self.release = threading.Event()
        self.models_reply = (200, json.dumps({"object": "list", "data": [{"id": MODEL}]}).encode())
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go in separate writes

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                status, raw = srv.models_reply if self.path == "/v1/models" else (404, b"{}")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self):
                with srv.lock:
                    srv.inflight += 1
                    srv.max_inflight = max(srv.max_inflight, srv.inflight)
                    index = srv.count
                    srv.count += 1
                try:
                    n = int(self.headers.get("Content-Length", "0"))
                    body = json.loads(self.rfile.read(n))
                    with srv.lock:
                        srv.bodies.append(body)
                        srv.headers.append(dict(self.headers))
                        srv.paths.append(self.path)
                    if srv.delay_s:
                        time.sleep(srv.delay_s)
                    out = srv.script(body, dict(self.headers), index)
                finally:
                    with srv.lock:
                        srv.inflight -= 1
                if isinstance(out, str):
                    status = 200
                    raw = json.dumps(
                        {"choices": [{"index": 0, "message": {"role": "assistant", "content": out}}]}
                    ).encode()
                else:
                    status, raw = out
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:  # client gave up (timeout test)
                    pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 64  # default 5 drops SYNs under 8 concurrent connects (1 s stalls)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    srv = FakeJudgeServer()
    yield srv
    srv.stop()


def make_judge(server, **kw):
    kw.setdefault("timeout_s", 5.0)
    kw.setdefault("backoff_s", 0.01)
    return VLMJudge(server.url, MODEL, **kw)


def graded_images(n=2, g=4, size=8, seed=0):
    """Groups whose images have distinct, shuffled brightness levels."""
    rng = np.random.default_rng(seed)
    levels = np.stack([rng.permutation(g) for _ in range(n)])  # [N, G]
    base = 0.1 + 0.8 * levels / (g - 1)
    noise = rng.uniform(-0.02, 0.02, size=(n, g, size, size, 3))
    imgs = np.clip(base[:, :, None, None, None] + noise, 0.0, 1.0).astype(np.float32)
    return imgs, levels


def expected_matrix(levels):
    return (levels[:, :, None] > levels[:, None, :]).astype(np.float32) + 0.5 * np.eye(
        levels.shape[1], dtype=np.float32
    )


# --------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "text, want",
    [
        ("<think>x</think><answer>Image 1 is better</answer>", 1.0),
        ("<think>x</think><answer>Image 2 is better</answer>", 0.0),
        ("<answer>  image 2 IS better. \n</answer>", 0.0),
        ("<ANSWER>\nImage  1 is better.</ANSWER>", 1.0),
        ("<think>maybe <answer>Image 1 is better</answer>?</think><answer>Image 2 is better</answer>", 0.0),
        ("<think>x</think><answer>Image 1 is better", 1.0),  # closing tag cut off
        ("<answer>Image 1 is better, no, Image 2 is better</answer>", None),
        ("<answer>Both images are equally good</answer>", None),
        ("Image 1 is better", None),  # no answer tag
        ("<answer>Image 11 is better</answer>", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_preference(text, want):
    assert parse_preference(text) == want


def test_png_roundtrip():
    img = np.random.default_rng(1).uniform(size=(5, 7, 3)).astype(np.float32)
    url = encode_image_data_url(img, "png")
    assert url.startswith("data:image/png;base64,")
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    np.testing.assert_array_equal(got, np.rint(img * 255).astype(np.uint8))


def test_jpeg_q95_is_the_default_encoding(server, tmp_path):
    # A smooth image: JPEG q95 is close to it, and the bytes are a JPEG.
    y, x = np.mgrid[0:32, 0:32] / 31.0
    img = np.stack([x, y, 0.5 * (x + y)], axis=-1).astype(np.float32)
    url = encode_image_data_url(img)
    assert url.startswith("data:image/jpeg;base64,")
    raw = base64.b64decode(url.split(",", 1)[1])
    assert raw[:2] == b"\xff\xd8"
    got = np.asarray(Image.open(io.BytesIO(raw)), np.float32) / 255.0
    assert np.abs(got - img).mean() < 0.01
    with pytest.raises(ValueError, match="image_format"):
        encode_image_data_url(img, "webp")
    judge = VLMJudge(server.url, MODEL)
    assert judge.max_tokens == 4096 and judge.image_format == "jpeg" and judge.jpeg_quality == 95


def test_prompt_template_file(server, tmp_path):
    path = tmp_path / "template.txt"
    path.write_text("Compare the images for: {prompt}\nAnswer in <answer></answer>.", encoding="utf-8")
    judge = VLMJudge(server.url, MODEL, prompt_template_file=str(path))
    assert judge.prompt_template == path.read_text(encoding="utf-8")
    path.write_text("no placeholder", encoding="utf-8")
    with pytest.raises(ValueError, match="prompt_template_file"):
        VLMJudge(server.url, MODEL, prompt_template_file=str(path))
    with pytest.raises(ValueError, match="cannot be read"):
        VLMJudge(server.url, MODEL, prompt_template_file=str(tmp_path / "missing.txt"))


# ----------------------------------------------------------- happy path
def test_brightness_judge_matrix_and_request_format(server):
    imgs, levels = graded_images(n=2, g=4)
    prompts = ["a {braced} cat", "a dog"]
    # PNG (lossless): the pairs are identified below by their exact pixels.
    judge = make_judge(server, max_tokens=77, temperature=0.25, image_format="png")
    P = judge.preference_matrix(prompts, imgs)
    assert P.dtype == np.float32 and P.shape == (2, 4, 4)
    np.testing.assert_array_equal(P, expected_matrix(levels))
    np.testing.assert_allclose(P + P.transpose(0, 2, 1), 1.0)

    st = judge.stats
    assert isinstance(st, JudgeStats)
    assert (st.requests, st.failed, st.unparseable, st.ties, st.retried) == (12, 0, 0, 0, 0)
    assert st.calls == 1 and st.wall_s > 0
    assert server.count == 12
    assert set(server.paths) == {"/v1/chat/completions"}

    body = server.bodies[0]
    assert body["model"] == MODEL and body["max_tokens"] == 77 and body["temperature"] == 0.25
    msgs = body["messages"]
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    assert [p["type"] for p in msgs[0]["content"]] == ["image_url", "image_url", "text"]
    assert "Authorization" not in server.headers[0]
    # each pair once, in order (i as Image 1, j as Image 2): check via pixels
    seen = set()
    for b in server.bodies:
        n = prompts.index(prompt_of(b))
        a, c = decode_images(b)
        q8 = np.rint(imgs[n] * 255).astype(np.uint8)
        i = next(k for k in range(4) if np.array_equal(q8[k], a))
        j = next(k for k in range(4) if np.array_equal(q8[k], c))
        assert i < j
        seen.add((n, i, j))
    assert len(seen) == 12
    text = msgs[0]["content"][2]["text"]
    for word in ("semantic consistency", "aesthetics", "authenticity", "<think>", "<answer>"):
        assert word in text.lower()
    assert "Image 1 is better" in text and "Image 2 is better" in text
    assert text.endswith("Text Caption: [a {braced} cat]") or text.endswith("Text Caption: [a dog]")


def test_trailing_slash_and_custom_template(server):
    imgs, levels = graded_images(n=1, g=2)
    tmpl = "Pick one. Caption: <<{prompt}>>"
    server.script = lambda body, h, i: (
        answer(1) if body["messages"][0]["content"][2]["text"] == "Pick one. Caption: <<x>>" else "?"
    )
    judge = VLMJudge(server.url + "/", MODEL, prompt_template=tmpl)
    P = judge.preference_matrix(["x"], imgs)
    assert P[0, 0, 1] == 1.0 and P[0, 1, 0] == 0.0
    assert server.paths == ["/v1/chat/completions"]
    with pytest.raises(ValueError, match="prompt"):
        VLMJudge(server.url, MODEL, prompt_template="no placeholder")


# -------------------------------------------------------------- garbled
def test_garbled_answers_are_ties_and_counted(server, caplog):
    replies = {
        "a": "<think>hmm</think><answer>They are equally good</answer>",
        "b": "<answer>Image 1 is better and Image 2 is better</answer>",
        "c": "Image 1 is better",
        "d": answer(2),
    }
    server.script = lambda body, h, i: replies[prompt_of(body)]
    imgs = np.full((4, 2, 4, 4, 3), 0.5, np.float32)
    judge = make_judge(server)
    with caplog.at_level(logging.WARNING, logger="prefgrpo_jax.judge"):
        P = judge.preference_matrix(list("abcd"), imgs)
    np.testing.assert_array_equal(P[:3], np.full((3, 2, 2), 0.5, np.float32))
    np.testing.assert_array_equal(P[3], [[0.5, 0.0], [1.0, 0.5]])
    st = judge.stats
    assert (st.requests, st.unparseable, st.ties, st.failed) == (4, 3, 3, 0)
    msgs = [r.getMessage() for r in caplog.records if r.name == "prefgrpo_jax.judge"]
    assert sum("unparseable" in m for m in msgs) == 3


def test_malformed_body_is_a_failure_not_a_crash(server):
    server.script = lambda body, h, i: (
        (200, b"<html>not json</html>") if prompt_of(body) == "bad" else answer(1)
    )
    imgs = np.full((2, 2, 4, 4, 3), 0.5, np.float32)
    judge = make_judge(server, retries=2)
    P = judge.preference_matrix(["bad", "good"], imgs)
    assert P[0, 0, 1] == 0.5 and P[1, 0, 1] == 1.0
    st = judge.stats
    assert (st.failed, st.retried, st.ties) == (1, 0, 1)  # not retried


# -------------------------------------------------------------- retries
def test_http_500_twice_then_ok_is_retried(server):
    def script(body, h, index):
        if index < 2:
            return (500, b'{"error": "overloaded"}')
        return brightness_judge(body)

    server.script = script
    imgs, levels = graded_images(n=1, g=2)
    judge = make_judge(server, retries=3, max_concurrency=1)
    P = judge.preference_matrix(["p"], imgs)
    np.testing.assert_array_equal(P, expected_matrix(levels))
    st = judge.stats
    assert (st.requests, st.retried, st.failed, st.ties) == (1, 2, 0, 0)
    assert server.count == 3


def test_429_retried_but_other_4xx_not(server, caplog):
    seen = {"rate": 0}
    lock = threading.Lock()

    def script(body, h, index):
        p = prompt_of(body)
        if p == "rate":
            with lock:
                seen["rate"] += 1
                first = seen["rate"] == 1
            return (429, b"slow down") if first else brightness_judge(body)
        if p == "bad":
            return (400, b'{"error": "context too long"}')
        return brightness_judge(body)

    server.script = script
    imgs, levels = graded_images(n=3, g=3)
    judge = make_judge(server, retries=2)
    with caplog.at_level(logging.WARNING, logger="prefgrpo_jax.judge"):
        P = judge.preference_matrix(["rate", "bad", "ok"], imgs)
    want = expected_matrix(levels)
    np.testing.assert_array_equal(P[0], want[0])
    np.testing.assert_array_equal(P[1], np.full((3, 3), 0.5, np.float32))
    np.testing.assert_array_equal(P[2], want[2])
    st = judge.stats
    assert (st.requests, st.failed, st.ties, st.retried) == (9, 3, 3, 1)
    assert server.count == 10  # the 400s were sent once each
    fails = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(fails) == 3 and all("HTTP 400" in m for m in fails)


def test_hanging_judge_times_out_to_tie(server, caplog):
    def script(body, h, index):
        if prompt_of(body) == "slow":
            server.release.wait(5.0)  # released at teardown
        return brightness_judge(body)

    server.script = script
    imgs, levels = graded_images(n=2, g=2)
    judge = make_judge(server, timeout_s=0.3, retries=1)
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="prefgrpo_jax.judge"):
        P = judge.preference_matrix(["slow", "fast"], imgs)
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0
    assert P[0, 0, 1] == 0.5 and P[0, 1, 0] == 0.5
    np.testing.assert_array_equal(P[1], expected_matrix(levels)[1])
    st = judge.stats
    assert (st.requests, st.failed, st.ties, st.retried) == (2, 1, 1, 1)
    assert any("timed out" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------- concurrency
@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_bound(server, limit):
    server.delay_s = 0.04
    imgs, levels = graded_images(n=2, g=4)  # 12 requests
    judge = make_judge(server, max_concurrency=limit)
    P = judge.preference_matrix(["p", "q"], imgs)
    np.testing.assert_array_equal(P, expected_matrix(levels))
    assert server.max_inflight <= limit
    if limit > 1:
        assert server.max_inflight > 1
    judge.close()


# --------------------------------------------------------------- api key
def test_api_key_in_header_never_in_logs_or_repr(server, caplog, monkeypatch):
    secret = "sk-Zq7Wx9Kp3Lm5Nv8Rt2Yh"
    windows = [secret[k : k + 6] for k in range(len(secret) - 5)]  # no partial leaks either
    monkeypatch.setenv("PREFGRPO_TEST_JUDGE_KEY", secret)

    def script(body, h, index):  # a hostile server echoing the credentials back
        p = prompt_of(body)
        auth = h.get("Authorization", "")
        if p == "echo":
            return (500, json.dumps({"error": "bad auth " + auth}).encode())
        if p == "echo-cut":  # raw key straddling the 200-char truncation of error details
            return (400, ("x" * 195 + secret).encode())
        if p == "garbled":  # key straddling the 160-char tail kept of unparseable replies
            return "<answer>I cannot tell " + secret + "y" * 150 + "</answer>"
        if p == "malformed":
            return (200, ("z" * 110 + secret).encode())
        return brightness_judge(body)

    server.script = script
    prompts = ["echo", "echo-cut", "garbled", "malformed", "ok"]
    imgs, _ = graded_images(n=len(prompts), g=2)
    judge = make_judge(server, api_key_env="PREFGRPO_TEST_JUDGE_KEY", retries=1)
    with caplog.at_level(logging.DEBUG, logger="prefgrpo_jax.judge"):
        judge.preference_matrix(prompts, imgs)
    assert all(h.get("Authorization") == f"Bearer {secret}" for h in server.headers)
    assert judge.stats.failed == 3 and judge.stats.unparseable == 1
    msgs = [r.getMessage() for r in caplog.records if r.name == "prefgrpo_jax.judge"]
    assert len(msgs) >= 5  # failures, the retry and the unparseable reply were logged...
    for m in msgs + [repr(judge), str(judge)]:  # ...without the key
        assert not any(w in m for w in windows), m
    assert "PREFGRPO_TEST_JUDGE_KEY" in repr(judge)

    # all-failing with a key: the error message must not leak it either
    server.script = lambda body, h, i: (503, ("down " + h.get("Authorization", "")).encode())
    with pytest.raises(JudgeUnavailableError) as ei:
        judge.preference_matrix(["x"], imgs[:1])
    assert not any(w in str(ei.value) for w in windows)


def test_api_key_env_unset_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("PREFGRPO_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="PREFGRPO_TEST_UNSET_KEY"):
        VLMJudge("http://127.0.0.1:9", MODEL, api_key_env="PREFGRPO_TEST_UNSET_KEY")


# ---------------------------------------------------------------- debias
def test_debias_judges_both_orders_and_cancels_position_bias(server):
    server.script = lambda body, h, i: answer(1)  # always prefers the first image
    imgs, levels = graded_images(n=2, g=4)
    g = 4

    biased = make_judge(server)
    P = biased.preference_matrix(["p", "q"], imgs)
    iu = np.triu_indices(g, 1)
    assert np.all(P[:, iu[0], iu[1]] == 1.0) and server.count == 2 * g * (g - 1) // 2

    server.count = 0
    judge = make_judge(server, debias=True)
    P = judge.preference_matrix(["p", "q"], imgs)
    np.testing.assert_array_equal(P, np.full((2, g, g), 0.5, np.float32))
    assert server.count == 2 * g * (g - 1)
    assert judge.stats.requests == 2 * g * (g - 1)
    assert judge.stats.ties == 0  # 0.5 from averaging, not from ties

    server.count = 0
    server.script = lambda body, h, i: brightness_judge(body)
    P = judge.preference_matrix(["p", "q"], imgs)
    np.testing.assert_array_equal(P, expected_matrix(levels))
    assert server.count == 2 * g * (g - 1)


# ------------------------------------------------------------ unavailable
def test_all_failing_server_raises(server):
    server.script = lambda body, h, i: (500, b"boom")
    imgs, _ = graded_images(n=1, g=3)
    judge = make_judge(server, retries=1)
    with pytest.raises(JudgeUnavailableError) as ei:
        judge.preference_matrix(["p"], imgs)
    msg = str(ei.value)
    assert server.url in msg and "HTTP 500" in msg
    st = judge.stats
    assert (st.requests, st.failed, st.retried) == (3, 3, 3)


def test_unreachable_server_raises():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}"
    judge = VLMJudge(url, MODEL, retries=1, backoff_s=0.01, timeout_s=0.5)
    imgs, _ = graded_images(n=1, g=2)
    with pytest.raises(JudgeUnavailableError, match=f"127.0.0.1:{port}"):
        judge.preference_matrix(["p"], imgs)
    assert judge.stats.failed == 1 and judge.stats.retried == 1


# ------------------------------------------------------------- bad input
def test_bad_inputs_raise_value_error():
    judge = VLMJudge("http://127.0.0.1:9", MODEL)
    ok, _ = graded_images(n=2, g=3)
    bad_cases = [
        (["a", "b"], ok[0]),  # 4-D
        (["a", "b"], ok[..., :1]),  # one channel
        (["a"], ok),  # N mismatch
        (["a", "b"], ok[:, :1]),  # G = 1
        (["a", "b"], ok * 2.0),  # out of range
        (["a", "b"], ok - 0.5),  # negative
        (["a", "b"], np.where(ok > 0.5, np.nan, ok)),  # NaN
        (["a", "b"], (ok * 255).astype(np.int32)),  # integer other than uint8
        ("ab", ok),  # a string is not a list of prompts
        (["a", 3], ok),  # non-str prompt
    ]
    for prompts, imgs in bad_cases:
        with pytest.raises(ValueError):
            judge.preference_matrix(prompts, imgs)
    assert judge.stats.requests == 0  # nothing was sent

    for kw in (
        dict(max_concurrency=0),
        dict(timeout_s=0),
        dict(retries=-1),
        dict(backoff_s=-1.0),
        dict(max_tokens=0),
        dict(step_deadline_s=0.0),
    ):
        with pytest.raises(ValueError):
            VLMJudge("http://127.0.0.1:9", MODEL, **kw)
    for url in ("", "127.0.0.1:8080", "ftp://host"):
        with pytest.raises(ValueError):
            VLMJudge(url, MODEL)


def test_default_prompt_has_placeholder_and_context_manager(server):
    assert DEFAULT_PAIRWISE_PROMPT.rstrip().endswith("Text Caption: [{prompt}]")
    imgs, levels = graded_images(n=1, g=3)
    with make_judge(server) as judge:
        P = judge.preference_matrix(["p"], imgs)
        np.testing.assert_array_equal(P, expected_matrix(levels))
        assert judge.stats.as_dict()["requests"] == 3
        judge.reset_stats()
        assert judge.stats.requests == 0
    with pytest.raises(RuntimeError):
        judge.preference_matrix(["p"], imgs)


# ---------------------------------------------------------------- testpoints


@pytest.mark.parametrize("text,k,want", [
    ("<think>..</think><answer>1: yes\n2: no</answer>", 2, [True, False]),
    ("<answer>\n1. Yes\n 2) NO.\n3 - **yes**\n</answer>", 3, [True, False, True]),
    ("<answer>1: yes</answer>", 2, [True, None]),  # missing line
    ("<answer>1: yes\n1: no\n2: no</answer>", 2, [None, False]),  # conflicting verdicts
    ("<answer>1: yes\n7: no</answer>", 1, [True]),  # out-of-range number ignored
    ("1: yes\n2: yes", 2, [None, None]),  # no answer block
    ("<answer>old: 1: no</answer> <answer>1: yes", 1, [True]),  # last block, unclosed
    (None, 1, [None]),
])
def test_parse_testpoints(text, k, want):
    assert parse_testpoints(text, k) == want


def reply_to_testpoints(body: dict) -> str:
    """Answers yes to a question that contains 'bright' iff the image is bright."""
    text = body["messages"][0]["content"][-1]["text"]
    questions = text.split("Test points:\n", 1)[1].splitlines()
    (image,) = decode_images(body)
    lines = []
    for q in questions:
        number, question = q.split(". ", 1)
        ok = ("bright" in question) == (image.mean() > 127)
        lines.append(f"{number}: {'yes' if ok else 'no'}")
    return "<think>looked</think><answer>" + "\n".join(lines) + "</answer>"


def test_testpoint_scores_request_format_and_verdicts(server):
    server.script = lambda body, headers, index: reply_to_testpoints(body)
    images = np.stack([np.full((8, 8, 3), 0.9), np.full((8, 8, 3), 0.1)]).astype(np.float32)
    tps = [["is it bright?", "is it dark?"], ["is it bright?"]]
    judge = make_judge(server)
    scores = judge.testpoint_scores(["a lamp", "a cave"], images, tps)
    np.testing.assert_array_equal(scores[0], [1.0, 0.0])
    np.testing.assert_array_equal(scores[1], [0.0])
    assert all(s.dtype == np.float32 for s in scores)
    assert len(server.bodies) == 2  # one request per image, all its testpoints at once
    body = next(b for b in server.bodies if "a lamp" in b["messages"][0]["content"][-1]["text"])
    text = body["messages"][0]["content"][-1]["text"]
    assert "Text Caption: [a lamp]" in text and "1. is it bright?\n2. is it dark?" in text
    assert [p["type"] for p in body["messages"][0]["content"]] == ["image_url", "text"]
    assert judge.stats.requests == 2 and judge.stats.unparseable == 0 and judge.stats.ties == 0


def test_testpoint_missing_verdicts_and_failures_are_nan_and_counted(server, caplog):
    def script(body, headers, index):
        if "broken" in body["messages"][0]["content"][-1]["text"]:
            return 500, b"down"
        return "<answer>1: yes</answer>"  # second testpoint never answered
    server.script = script
    judge = make_judge(server, retries=1)
    images = np.full((2, 4, 4, 3), 0.5, np.float32)
    with caplog.at_level(logging.WARNING, logger="prefgrpo_jax.judge"):
        scores = judge.testpoint_scores(["ok", "broken"], images, [["a", "b"], ["c"]])
    np.testing.assert_array_equal(scores[0], [1.0, np.nan])
    assert np.isnan(scores[1]).all()
    st = judge.stats
    assert (st.requests, st.failed, st.unparseable, st.retried, st.ties) == (2, 1, 1, 1, 0)
    assert "testpoint(s) [2]" in caplog.text


def test_testpoint_all_failing_raises_and_bad_inputs(server):
    server.script = lambda body, headers, index: (503, b"")
    judge = make_judge(server, retries=0)
    with pytest.raises(JudgeUnavailableError, match="all 1 judge requests"):
        judge.testpoint_scores(["p"], np.zeros((1, 4, 4, 3), np.float32), [["q"]])
    with pytest.raises(ValueError, match=r"shape \[N, H, W, 3\]"):
        judge.testpoint_scores(["p"], np.zeros((1, 1, 4, 4, 3), np.float32), [["q"]])
    with pytest.raises(ValueError, match="one non-empty list of question strings per prompt"):
        judge.testpoint_scores(["p"], np.zeros((1, 4, 4, 3), np.float32), [[]])
    with pytest.raises(ValueError, match="testpoint_template must be a string containing"):
        make_judge(server, testpoint_template="no fields")
