"""The judge's HTTP transport under hostile servers: redirects and trickled replies."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

from prefgrpo_jax.rewards.judge import JudgeUnavailableError, VLMJudge
from test_judge import MODEL, FakeJudgeServer, answer, graded_images, make_judge


@pytest.fixture
def servers():
    made = [FakeJudgeServer(), FakeJudgeServer()]
    yield made
    for s in made:
        s.stop()


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_is_not_followed_and_key_stays_home(servers, monkeypatch, status):
    judge_srv, other = servers
    secret = "sk-redirect-Qx81"
    monkeypatch.setenv("PREFGRPO_TEST_JUDGE_KEY", secret)
    target = other.url + "/steal"
    judge_srv.script = lambda body, h, i: (status, json.dumps({"moved": target}).encode())
    # BaseHTTPRequestHandler sends no Location by itself: add one to every reply.
    judge_srv.httpd.RequestHandlerClass.end_headers = _with_location(target)
    judge = make_judge(judge_srv, api_key_env="PREFGRPO_TEST_JUDGE_KEY", retries=2)
    imgs, _ = graded_images(n=1, g=2)
    with pytest.raises(JudgeUnavailableError) as err:
        judge.preference_matrix(["p"], imgs)
    assert other.count == 0 and other.headers == []  # nothing, let alone the key, reached the other host
    assert judge_srv.count == 1  # a redirect is not retried
    msg = str(err.value)
    assert f"HTTP {status} redirect to {other.url}/steal, not followed" in msg and "base_url" in msg
    assert secret not in msg


def _with_location(url):
    from http.server import BaseHTTPRequestHandler

    def end_headers(self):
        self.send_header("Location", url)
        BaseHTTPRequestHandler.end_headers(self)

    return end_headers


class TrickleServer:
    """Answers every request with a valid reply sent one byte per ``gap_s``:
    each socket read succeeds long before a per-read timeout would fire."""

    def __init__(self, gap_s: float, where: str = "body"):
        self.gap_s, self.where = gap_s, where
        self.count = 0
        self.stop_event = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop_event.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
            while len(body) < length:
                body += conn.recv(65536)
            content = json.dumps({"choices": [{"message": {"content": answer(1)}}]}).encode()
            headers = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(content)}\r\n\r\n").encode()
            # "headers": even the status line trickles; "body": headers at once, then the body.
            fast, slow = (b"", headers + content) if self.where == "headers" else (headers, content)
            try:
                conn.sendall(fast)
                for k in range(len(slow)):
                    if self.stop_event.wait(self.gap_s):
                        return
                    conn.sendall(slow[k:k + 1])
            except OSError:  # the client gave up: what the deadline is for
                return

    def stop(self):
        self.stop_event.set()
        self.sock.close()


@pytest.mark.parametrize("where", ["headers", "body"])
def test_trickling_server_is_cut_off_at_the_deadline(where):
    srv = TrickleServer(gap_s=0.05, where=where)
    try:
        # Each read returns within 0.05 s, far under timeout_s; the whole reply
        # would take > 5 s. One attempt is bounded by timeout_s, all of them by deadline_s.
        judge = VLMJudge(srv.url, MODEL, timeout_s=0.4, retries=5, deadline_s=1.0, backoff_s=0.0)
        imgs, _ = graded_images(n=1, g=2)
        t0 = time.perf_counter()
        with pytest.raises(JudgeUnavailableError, match="timed out: no complete reply within"):
            judge.preference_matrix(["p"], imgs)
        elapsed = time.perf_counter() - t0
        assert elapsed < 1.6, elapsed
        st = judge.stats
        # 0.4 + 0.4 + the 0.2 s left: three attempts fit in the 1 s deadline, not six.
        assert st.failed == 1 and st.retried == 2 and srv.count == 3
    finally:
        srv.stop()


def test_deadline_bounds_retries_and_backoff(servers):
    srv = servers[0]
    srv.script = lambda body, h, i: (503, b"busy")
    judge = make_judge(srv, retries=50, backoff_s=0.1, deadline_s=0.5)
    imgs, _ = graded_images(n=1, g=2)
    t0 = time.perf_counter()
    with pytest.raises(JudgeUnavailableError, match="HTTP 503"):
        judge.preference_matrix(["p"], imgs)
    assert time.perf_counter() - t0 < 0.9
    # backoff 0.1, 0.2 fit in 0.5 s; the next (0.4) would not.
    assert srv.count == 3 and judge.stats.retried == 2


def test_default_deadline_and_validation():
    judge = VLMJudge("http://127.0.0.1:9", MODEL, timeout_s=2.0, retries=3)
    assert judge.deadline_s == 8.0
    with pytest.raises(ValueError, match="deadline_s must be > 0"):
        VLMJudge("http://127.0.0.1:9", MODEL, deadline_s=0.0)
    np.testing.assert_equal(VLMJudge("http://127.0.0.1:9", MODEL, deadline_s=3).deadline_s, 3.0)
