"""Pairwise VLM judge client (OpenAI-compatible chat completions, e.g. vLLM).

The Pref-GRPO reward is a win rate computed from pairwise comparisons made by
a vision-language judge (UnifiedReward-Think in the reference). This module
sends every unordered image pair of a group to such a judge over HTTP and
assembles the answers into a preference matrix::

    judge = VLMJudge("http://127.0.0.1:8080", "CodeGoat24/UnifiedReward-Think-qwen-7b")
    P = judge.preference_matrix(prompts, images)   # images: [N, G, H, W, 3] in [0, 1]
    win_rate = (P.sum(-1) - 0.5) / (G - 1)          # diagonal is 0.5

``P[n, i, j]`` is the probability that image ``i`` beats image ``j`` for prompt
``n``: 1 / 0 for a clear verdict, 0.5 for a tie (an unparseable answer or a
request that failed after its retries). ``P + P^T = 1`` off the diagonal.

Differences from the reference client, all opt-in or purely defensive:

* ``debias=True`` judges each pair in both orders and averages, cancelling the
  judge's position bias (at twice the calls).
* :meth:`VLMJudge.testpoint_scores` asks the same server UniGenBench-style
  yes/no questions about single images (``--mode=eval`` with a real model).
* bounded concurrency, retries with exponential backoff on connection errors
  / timeouts / HTTP 429 / 5xx, and counters (:class:`JudgeStats`) so that
  failures are visible instead of silent.
* wall-clock deadlines: ``timeout_s`` bounds one whole attempt (connect, send,
  the complete reply) and ``deadline_s`` one judgment with all its retries and
  backoff, so a server trickling a byte at a time cannot stall a step.
* redirects are never followed: the API key goes to the configured origin
  only; a 3xx is a non-retried failure naming where the server pointed.
* if *every* request of a call fails, :class:`JudgeUnavailableError` is raised:
  an unreachable judge must not silently turn into all-0.5 rewards.
* a step can judge group by group (:meth:`VLMJudge.start_round`): each group's
  pairs are sent as soon as its images exist, and a per-step deadline
  (``step_deadline_s``) turns the pairs still outstanding into ties, counted as
  ``late``, instead of holding the step (and every accelerator) hostage.

Only the standard library, numpy and pillow are used.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import http.client
import io
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_PAIRWISE_PROMPT",
    "DEFAULT_TESTPOINT_PROMPT",
    "JudgeRound",
    "JudgeStats",
    "JudgeUnavailableError",
    "VLMJudge",
    "encode_image_data_url",
    "image_to_uint8",
    "parse_preference",
    "parse_testpoints",
]

logger = logging.getLogger("prefgrpo_jax.judge")

# Pairwise prompt, written after the description of the reference prompt:
# three dimensions scored 1-10 per image, reasoning in <think>, verdict in
# <answer>, caption last. ``{prompt}`` is replaced by the text prompt (plain
# string replacement, so braces inside prompts are harmless).
DEFAULT_PAIRWISE_PROMPT = (
    "You are shown two images, Image 1 and Image 2, that were generated from "
    "the same text caption. Decide which of the two is better.\n"
    "Judge both images on three dimensions and give each image a score from "
    "1 to 10 on every dimension:\n"
    "1. Semantic consistency: how faithfully the image depicts the caption - "
    "the objects, their counts, attributes, actions, spatial relations and any "
    "text the caption asks for.\n"
    "2. Aesthetics: composition, lighting, colour harmony and overall visual "
    "appeal.\n"
    "3. Authenticity: how realistic and artifact-free the image is - natural "
    "anatomy and textures, no distortions, no garbled details.\n"
    "Put your reasoning, including the per-dimension scores of both images and "
    "their totals, inside <think> and </think>. Then give your verdict inside "
    "<answer> and </answer>; the verdict must be exactly one of these two "
    "sentences: Image 1 is better / Image 2 is better\n"
    "Required format: <think>your reasoning</think><answer>Image 1 is better"
    "</answer> (or Image 2 is better inside the answer tags).\n"
    "Text Caption: [{prompt}]"
)

# Evaluation prompt (UniGenBench-style): one image, its caption and numbered
# binary testpoints; one verdict line per testpoint inside <answer>.
DEFAULT_TESTPOINT_PROMPT = (
    "You are shown one image that was generated from the text caption below. "
    "Check the image against each numbered test point: does the image satisfy it?\n"
    "Think about every test point inside <think> and </think>. Then, inside "
    "<answer> and </answer>, write one line per test point, in order, exactly "
    "in the form `N: yes` or `N: no`.\n"
    "Text Caption: [{prompt}]\n"
    "Test points:\n{testpoints}"
)

_PROMPT_FIELD = "{prompt}"
_TESTPOINTS_FIELD = "{testpoints}"

_ANSWER_RE = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.IGNORECASE | re.DOTALL)
_IMG1_RE = re.compile(r"\bimage\s*1\s+is\s+better\b", re.IGNORECASE)
_IMG2_RE = re.compile(r"\bimage\s*2\s+is\s+better\b", re.IGNORECASE)
_TESTPOINT_RE = re.compile(r"^\W*(\d+)\s*[:.)\-]\s*\**\s*(yes|no)\b", re.IGNORECASE | re.MULTILINE)

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BEARER_RE = re.compile(r"Bearer\s+\S+", re.IGNORECASE)
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
_MAX_RETRY_AFTER_S = 30.0


def is_env_var_name(value) -> bool:
    """True for a plausible environment variable name (what ``api_key_env`` must hold)."""
    return isinstance(value, str) and _ENV_NAME_RE.fullmatch(value) is not None


class JudgeUnavailableError(RuntimeError):
    """Every request of a ``preference_matrix`` call failed."""


@dataclasses.dataclass
class JudgeStats:
    """Cumulative counters of a :class:`VLMJudge` (reset with ``reset_stats``).

    requests:    judgments issued (one per pair and order; retries not counted)
    failed:      judgments with no usable HTTP response after all retries
    unparseable: judgments whose reply held neither or both verdicts (pairwise)
                 or missed a verdict for at least one testpoint (testpoints)
    ties:        pairwise judgments scored 0.5 (= their failed + unparseable + late)
    late:        pairwise judgments still outstanding at a round's step deadline
    retried:     extra HTTP attempts made because of retriable errors
    calls:       ``preference_matrix`` / ``testpoint_scores`` calls
    wall_s:      total wall-clock seconds spent in them
    """

    requests: int = 0
    failed: int = 0
    unparseable: int = 0
    ties: int = 0
    late: int = 0
    retried: int = 0
    calls: int = 0
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_preference(text: Optional[str]) -> Optional[float]:
    """Score of Image 1 from a judge reply: 1.0, 0.0, or None (unparseable).

    The verdict is read from the last ``<answer>...</answer>`` block (a closing
    tag cut off at the end of the reply is tolerated); whitespace, case and
    trailing punctuation do not matter. Both or neither verdict -> None.
    """
    if not isinstance(text, str):
        return None
    blocks = _ANSWER_RE.findall(text)
    if not blocks:
        return None
    answer = blocks[-1]
    one = _IMG1_RE.search(answer) is not None
    two = _IMG2_RE.search(answer) is not None
    if one == two:
        return None
    return 1.0 if one else 0.0


def parse_testpoints(text: Optional[str], num_testpoints: int) -> list[Optional[bool]]:
    """Verdicts ``N: yes`` / ``N: no`` (1-based) from the last ``<answer>`` block.

    A testpoint with no verdict, or with conflicting ones, is None; so is every
    testpoint when the reply has no answer block.
    """
    verdicts: list[Optional[bool]] = [None] * num_testpoints
    if not isinstance(text, str):
        return verdicts
    blocks = _ANSWER_RE.findall(text)
    if not blocks:
        return verdicts
    seen: dict[int, set[bool]] = {}
    for number, word in _TESTPOINT_RE.findall(blocks[-1]):
        seen.setdefault(int(number), set()).add(word.lower() == "yes")
    for number, values in seen.items():
        if 1 <= number <= num_testpoints and len(values) == 1:
            verdicts[number - 1] = values.pop()
    return verdicts


def image_to_uint8(image: np.ndarray) -> np.ndarray:
    """``[..., 3]`` float image in [0, 1] -> uint8 (round to nearest), as saved to PNG;
    uint8 images (converted on the accelerator, 4x less to move) pass through."""
    if np.asarray(image).dtype == np.uint8:
        return np.asarray(image)
    return np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


IMAGE_FORMATS = ("jpeg", "png")


def encode_image_data_url(image: np.ndarray, image_format: str = "jpeg", quality: int = 95) -> str:
    """``[H, W, 3]`` float image in [0, 1] (or uint8) -> ``data:image/<format>;base64,...``.

    JPEG at quality 95 is what the reference sends its judge (the images the
    judge was trained and evaluated on were JPEGs), and what UniGenBench's
    official client sends its PNG files re-encoded as; PNG is lossless.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    buf = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(image_to_uint8(image), mode="RGB").save(buf, format="JPEG", quality=int(quality))
    else:
        Image.fromarray(image_to_uint8(image), mode="RGB").save(buf, format="PNG")
    return f"data:image/{image_format};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _Watch:
    """One attempt's sockets, shut down by a timer when its deadline passes.

    A socket timeout bounds each ``recv`` only; shutting the socket down from
    the timer thread wakes the blocked read, so the attempt ends on time
    however slowly the server trickles bytes.
    """

    def __init__(self):
        self.expired = False
        self.event = threading.Event()  # set on expiry: wakes a backoff sleeping on it
        self._sockets: list = []
        self._lock = threading.Lock()

    def add(self, sock) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shutdown(sock)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        self.event.set()
        for sock in sockets:
            _shutdown(sock)


def _shutdown(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


# The calling thread's _Watch of the attempt and, inside a JudgeRound, the round's
# (urllib opens the connection in that thread).
_current_watch = threading.local()


def _watched(connection_cls):
    class Watched(connection_cls):
        def connect(self):
            super().connect()
            for name in ("watch", "cutoff"):
                watch = getattr(_current_watch, name, None)
                if watch is not None:
                    watch.add(self.sock)

    Watched.__name__ = f"Watched{connection_cls.__name__}"
    return Watched


_WatchedHTTP = _watched(http.client.HTTPConnection)
_WatchedHTTPS = _watched(http.client.HTTPSConnection)


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_WatchedHTTP, req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_WatchedHTTPS, req, context=self._context)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Turns every 3xx into an HTTPError: following one would send the
    ``Authorization`` header to whatever host the server names."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


# The error of a judgment cut off by its round's step deadline: a tie counted as
# ``late``, not as a failure (the judge answered too slowly, it is not down).
_LATE = "the step deadline passed"


class _Failure(Exception):
    def __init__(self, reason: str, retriable: bool, retry_after: Optional[float] = None):
        super().__init__(reason)
        self.reason = reason
        self.retriable = retriable
        self.retry_after = retry_after


class JudgeRound:
    """One step's pairwise judgments, submitted group by group as the images arrive.

    ``submit(b, prompt, images [G, H, W, 3])`` encodes group ``b`` (JPEG/PNG, in
    the calling thread) and queues its G(G-1)/2 pairs (both orders with
    ``debias``) on the judge's pool, which serves groups in submission order;
    ``wait(groups)`` blocks until those groups are judged or the step deadline
    passes; ``result()`` waits for all and returns ``P [N, G, G]`` float32.

    When the deadline (``deadline_s`` from the first ``submit``, when judging can
    start; None: none) passes,
    every judgment still queued or in flight is cut off (its socket shut, its
    backoff woken) and scored 0.5, counted in the judge's ``late`` and ``ties``.
    """

    def __init__(self, judge: "VLMJudge", num_groups: int, group_size: int,
                 deadline_s: Optional[float]):
        if num_groups < 1 or group_size < 2:
            raise ValueError(f"a round needs >= 1 group of >= 2 images, got {num_groups} x {group_size}")
        self.judge = judge
        self.num_groups, self.group_size = int(num_groups), int(group_size)
        self.deadline_s = None if deadline_s is None else float(deadline_s)
        self.started = self.end = None  # set by the first submit
        self._cutoff = _Watch()
        self._jobs: dict[int, list] = {}  # group -> [(i, j, swapped, future)]

    @property
    def expired(self) -> bool:
        """True once the step deadline cut the round off."""
        return self._cutoff.expired

    def submit(self, b: int, prompt: str, images) -> None:
        """Queues the pairs of group ``b``; ``images [G, H, W, 3]`` float in [0, 1] or uint8."""
        if not 0 <= b < self.num_groups or b in self._jobs:
            raise ValueError(f"group {b}: out of range [0, {self.num_groups}) or already submitted")
        arr = self.judge._validate([prompt], np.asarray(images)[None])[0]
        if arr.shape[0] != self.group_size:
            raise ValueError(f"group {b} holds {arr.shape[0]} images, the round {self.group_size}")
        judge, cutoff = self.judge, self._cutoff
        if self.started is None:
            self.started = time.monotonic()
            self.end = None if self.deadline_s is None else self.started + self.deadline_s
        urls = [judge._encode(image) for image in arr]
        pool = judge._pool()
        jobs = []
        for i in range(self.group_size):
            for j in range(i + 1, self.group_size):
                where = f"group {b}, pair ({i},{j})"
                jobs.append((i, j, pool.submit(judge._judge, prompt, urls[i], urls[j], where, cutoff)))
                if judge.debias:  # the swapped order; scored for image i below
                    where = f"group {b}, pair ({j},{i})"
                    jobs.append((j, i, pool.submit(judge._judge, prompt, urls[j], urls[i], where, cutoff)))
        self._jobs[b] = jobs

    def wait(self, groups: Sequence[int]) -> bool:
        """Blocks until ``groups`` (all submitted) are judged or the deadline passes
        (then the whole round is cut off); True if they finished in time."""
        missing = [b for b in groups if b not in self._jobs]
        if missing:
            raise ValueError(f"groups {missing} were never submitted to this round")
        futures = [f for b in groups for _, _, f in self._jobs[b]]
        timeout = None if self.end is None else max(0.0, self.end - time.monotonic())
        _, pending = concurrent.futures.wait(futures, timeout=timeout)
        if pending:
            self._cutoff.expire()
        return not pending

    def done(self, groups: Sequence[int]) -> bool:
        """True when ``groups`` need no more waiting (judged, or the round cut off)."""
        return all(b in self._jobs and all(f.done() for _, _, f in self._jobs[b]) for b in groups)

    def matrix(self, groups: Sequence[int]) -> np.ndarray:
        """``[len(groups), G, G]`` float32 of ``groups``, waiting for them (or the
        deadline) first; the rest of the round keeps going."""
        self.wait(groups)
        return self._assemble(groups)[0]

    def result(self) -> np.ndarray:
        """``[N, G, G]`` float32 once every group is judged or the deadline passed;
        counts the round in the judge's stats.

        Raises:
          JudgeUnavailableError: every judgment that finished in time failed.
        """
        if len(self._jobs) != self.num_groups:
            raise ValueError(f"only {len(self._jobs)} of the round's {self.num_groups} groups were submitted")
        groups = range(self.num_groups)
        self.wait(groups)
        P, errors, late = self._assemble(groups)
        self.judge._bump(calls=1, late=late, ties=late, wall_s=time.monotonic() - self.started)
        if late:
            logger.warning("judge: %d of %d judgments were still outstanding at the step deadline "
                           "(step_deadline_s=%g) and scored ties", late, late + len(errors), self.deadline_s)
        self.judge._raise_if_all_failed(errors)
        return P

    def _assemble(self, groups: Sequence[int]) -> tuple[np.ndarray, list, int]:
        """(P ``[len(groups), G, G]``, failure reasons of the judgments made in time, late count)."""
        g = self.group_size
        acc = np.zeros((len(groups), g, g), dtype=np.float64)
        cnt = np.zeros((len(groups), g, g), dtype=np.float64)
        errors, late = [], 0
        for row, b in enumerate(groups):
            for i, j, future in self._jobs[b]:
                score, error = future.result()  # quick once cut off: nothing waits any more
                if error is _LATE:
                    late += 1
                else:
                    errors.append(error)
                # Stored in the upper triangle as the score of the lower index.
                lo, hi, s = (i, j, score) if i < j else (j, i, 1.0 - score)
                acc[row, lo, hi] += s
                cnt[row, lo, hi] += 1.0
        P = np.full((len(groups), g, g), 0.5, dtype=np.float64)
        iu, ju = np.triu_indices(g, k=1)
        upper = acc[:, iu, ju] / cnt[:, iu, ju]
        P[:, iu, ju] = upper
        P[:, ju, iu] = 1.0 - upper
        return P.astype(np.float32), errors, late


class VLMJudge:
    """Client for a pairwise VLM judge behind an OpenAI-compatible server.

    Args:
      base_url: server root, e.g. ``http://127.0.0.1:8080``; requests go to
        ``{base_url}/v1/chat/completions``.
      model: model name as served.
      api_key_env: name of an environment variable holding the API key, read
        once here and sent as ``Authorization: Bearer ...``; None or "" sends none.
      max_concurrency: most requests in flight at once.
      timeout_s: wall-clock limit of one attempt: connecting, sending and
        reading the complete reply (not just each socket read).
      retries: extra attempts after a connection error, a timeout, HTTP 429 or
        5xx; other 4xx errors and redirects are not retried.
      deadline_s: wall-clock limit of one judgment, retries and backoff
        included; None = ``(retries + 1) * timeout_s``.
      backoff_s: sleep before retry k (k = 0, 1, ...) is ``backoff_s * 2**k``
        (or a server's Retry-After, at most 30 s, if larger).
      debias: also judge every pair with the images swapped and average.
      max_tokens, temperature: sampling settings sent with each request
        (4096: the reference's; the judge's reasoning runs long).
      prompt_template: overrides :data:`DEFAULT_PAIRWISE_PROMPT`; must contain
        ``{prompt}``.
      prompt_template_file: a UTF-8 text file holding the pairwise template
        (e.g. the official UnifiedReward-Think one, which the model was trained
        on; this project does not ship it); overrides ``prompt_template``.
      image_format, jpeg_quality: how images are sent (``encode_image_data_url``).
      step_deadline_s: wall-clock limit of one round (a training step's
        judgments, :meth:`start_round`) from its start: what is still
        outstanding then is a tie counted as ``late``; None = no limit.
      testpoint_template: overrides :data:`DEFAULT_TESTPOINT_PROMPT`; must
        contain ``{prompt}`` and ``{testpoints}``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: Optional[str] = None,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        retries: int = 3,
        deadline_s: Optional[float] = None,
        backoff_s: float = 1.0,
        debias: bool = False,
        max_tokens: int = 4096,
        temperature: float = 0.0,
        prompt_template: str = DEFAULT_PAIRWISE_PROMPT,
        testpoint_template: str = DEFAULT_TESTPOINT_PROMPT,
        prompt_template_file: Optional[str] = None,
        image_format: str = "jpeg",
        jpeg_quality: int = 95,
        step_deadline_s: Optional[float] = None,
    ):
        if not isinstance(base_url, str) or not base_url.strip():
            raise ValueError("base_url must be a non-empty string such as 'http://127.0.0.1:8080'")
        base_url = base_url.strip().rstrip("/")
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url must be an http(s) server root, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError("model must be a non-empty string")
        if int(max_concurrency) < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if not float(timeout_s) > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if int(retries) < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if deadline_s is not None and not float(deadline_s) > 0:
            raise ValueError(f"deadline_s must be > 0 or None, got {deadline_s}")
        if step_deadline_s is not None and not float(step_deadline_s) > 0:
            raise ValueError(f"step_deadline_s must be > 0 or None, got {step_deadline_s}")
        if not float(backoff_s) >= 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
        if int(max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if prompt_template_file:
            try:
                prompt_template = open(prompt_template_file, encoding="utf-8").read()
            except OSError as err:
                raise ValueError(f"prompt_template_file={prompt_template_file!r} cannot be read: {err}") from err
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        if not 1 <= int(jpeg_quality) <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
        if not isinstance(prompt_template, str) or _PROMPT_FIELD not in prompt_template:
            raise ValueError("prompt_template (or the text of prompt_template_file) must contain '{prompt}'")
        if not isinstance(testpoint_template, str) or _PROMPT_FIELD not in testpoint_template \
                or _TESTPOINTS_FIELD not in testpoint_template:
            raise ValueError("testpoint_template must be a string containing '{prompt}' and '{testpoints}'")

        self.base_url = base_url
        self.url = base_url + "/v1/chat/completions"
        self.model = model
        self.max_concurrency = int(max_concurrency)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.deadline_s = (
            float(deadline_s) if deadline_s is not None else (self.retries + 1) * self.timeout_s
        )
        self.backoff_s = float(backoff_s)
        self.debias = bool(debias)
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.prompt_template = prompt_template
        self.testpoint_template = testpoint_template
        self.image_format = image_format
        self.jpeg_quality = int(jpeg_quality)
        self.step_deadline_s = None if step_deadline_s is None else float(step_deadline_s)

        self._api_key: Optional[str] = None
        if api_key_env and not is_env_var_name(api_key_env):
            # Most likely the key itself, pasted in the wrong place: never echo it.
            raise ValueError(
                f"api_key_env must be the name of an environment variable (letters, digits, _), not "
                f"the key itself; got a value of {len(str(api_key_env))} characters (not shown)"
            )
        self.api_key_env = api_key_env or None  # "" (a config's "no key") means none
        if self.api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(
                    f"api_key_env={api_key_env!r} names an environment variable that is unset or empty"
                )
            self._api_key = key

        handlers = [_NoRedirect(), _WatchedHTTPHandler(), _WatchedHTTPSHandler()]
        if (parsed.hostname or "") in _LOOPBACK_HOSTS:
            handlers.append(urllib.request.ProxyHandler({}))  # never proxy a local judge
        self._opener = urllib.request.build_opener(*handlers)

        self._stats = JudgeStats()
        self._lock = threading.Lock()
        self._executor: Optional[ThreadPoolExecutor] = None
        self._closed = False

    # ------------------------------------------------------------------ misc
    def _encode(self, image: np.ndarray) -> str:
        return encode_image_data_url(image, self.image_format, self.jpeg_quality)

    def __repr__(self) -> str:
        return (
            f"VLMJudge(base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency}, "
            f"timeout_s={self.timeout_s}, retries={self.retries}, deadline_s={self.deadline_s}, "
            f"backoff_s={self.backoff_s}, "
            f"debias={self.debias}, max_tokens={self.max_tokens}, temperature={self.temperature})"
        )

    @property
    def stats(self) -> JudgeStats:
        """A snapshot copy of the cumulative counters."""
        with self._lock:
            return dataclasses.replace(self._stats)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = JudgeStats()

    def close(self) -> None:
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> "VLMJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pool(self) -> ThreadPoolExecutor:
        if self._closed:
            raise RuntimeError("VLMJudge is closed")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.max_concurrency, thread_name_prefix="vlm-judge"
            )
        return self._executor

    def _redact(self, s: str) -> str:
        """Remove the API key (and any bearer token) from text that may be logged."""
        if self._api_key:
            s = s.replace(self._api_key, "***")
        return _BEARER_RE.sub("Bearer ***", s)

    def _bump(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self._stats, k, getattr(self._stats, k) + v)

    # ------------------------------------------------------------ validation
    @staticmethod
    def _validate(prompts: Sequence[str], images, min_group: int = 2) -> np.ndarray:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of strings, one per image group")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("every prompt must be a str")
        arr = np.asarray(images)
        if arr.ndim != 5 or arr.shape[-1] != 3:
            raise ValueError(f"images must have shape [N, G, H, W, 3], got {arr.shape}")
        n, g, h, w, _ = arr.shape
        if n != len(prompts):
            raise ValueError(f"images hold {n} groups but {len(prompts)} prompts were given")
        if g < min_group:
            raise ValueError(f"need at least 2 images per group to compare, got G={g}")
        if h < 1 or w < 1:
            raise ValueError(f"images must be non-empty, got H={h}, W={w}")
        if arr.dtype == np.uint8:  # already quantised (on the accelerator): nothing to check
            return arr
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"images must be floating point in [0, 1] or uint8, got dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("images contain NaN or inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"images must lie in [0, 1], got range [{lo}, {hi}]")
        return arr

    # ---------------------------------------------------------------- HTTP
    def _payload(self, text: str, urls: Sequence[str]) -> bytes:
        body = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        *({"type": "image_url", "image_url": {"url": u}} for u in urls),
                        {"type": "text", "text": text},
                    ],
                }
            ],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        return json.dumps(body).encode("utf-8")

    def _post_once(self, data: bytes, budget_s: float, cutoff: Optional[_Watch] = None) -> str:
        """One POST that ends, reply read or not, within ``budget_s`` seconds (or when
        ``cutoff``, a round's step deadline, expires)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        watch = _Watch()
        timer = threading.Timer(budget_s, watch.expire)
        timer.daemon = True
        _current_watch.watch = watch
        _current_watch.cutoff = cutoff
        timer.start()
        try:
            raw = self._open_and_read(req, budget_s)
        except _Failure:
            if watch.expired:
                raise self._expired(budget_s) from None
            raise
        finally:
            timer.cancel()
            _current_watch.watch = None
            _current_watch.cutoff = None
        if watch.expired:  # a reply cut off by the shutdown can look complete
            raise self._expired(budget_s)
        return self._content(raw)

    def _expired(self, budget_s: float) -> "_Failure":
        return _Failure(f"timed out: no complete reply within {budget_s:.3g} s (timeout_s="
                        f"{self.timeout_s:g}, deadline_s={self.deadline_s:g})", retriable=True)

    def _open_and_read(self, req: urllib.request.Request, budget_s: float) -> bytes:
        try:
            with self._opener.open(req, timeout=budget_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            code = e.code
            try:
                detail = e.read(4096).decode("utf-8", "replace")
            except Exception:  # noqa: BLE001 - best-effort detail only
                detail = ""
            finally:
                e.close()
            if 300 <= code < 400:
                target = urllib.parse.urlsplit(urllib.parse.urljoin(self.url, e.headers.get("Location", "")))
                raise _Failure(
                    f"HTTP {code} redirect to {target.scheme}://{target.netloc}{target.path}, not "
                    "followed (the API key must not leave the configured server): set base_url to "
                    "the address the judge is served at", retriable=False)
            retry_after = None
            if code == 429:
                try:
                    retry_after = float(e.headers.get("Retry-After", ""))
                except (TypeError, ValueError, AttributeError):
                    retry_after = None
            detail = " ".join(self._redact(detail).split())[:200]  # redact, then truncate
            reason = f"HTTP {code}" + (f": {detail}" if detail else "")
            raise _Failure(reason, retriable=(code == 429 or code >= 500), retry_after=retry_after)
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _Failure(f"timed out connecting (timeout_s={self.timeout_s:g})", retriable=True)
            raise _Failure(f"connection error: {e.reason}", retriable=True)
        except TimeoutError as e:  # socket.timeout is TimeoutError since 3.10
            raise _Failure(f"timed out (timeout_s={self.timeout_s:g}): {e}", retriable=True)
        except (OSError, http.client.HTTPException) as e:  # resets, refusals, bad status lines
            raise _Failure(f"{type(e).__name__}: {e}", retriable=True)

    def _content(self, raw: bytes) -> str:
        try:
            obj = json.loads(raw.decode("utf-8"))
            content = obj["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            head = self._redact(raw[:4096].decode("utf-8", "replace"))[:120]
            raise _Failure(f"malformed response body ({type(e).__name__}): {head!r}",
                           retriable=False)
        if isinstance(content, list):  # some servers return content parts
            content = "".join(
                p.get("text", "") for p in content if isinstance(p, dict)
            )
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _Failure(f"malformed message content of type {type(content).__name__}",
                           retriable=False)
        return content

    def _request(self, data: bytes, where: str, cutoff: Optional[_Watch] = None
                 ) -> tuple[Optional[str], Optional[str]]:
        """(reply text, None), or (None, reason) after a failure (counted and logged),
        or (None, ``_LATE``) once ``cutoff`` (a round's step deadline) has expired.

        Every attempt and backoff fits in ``deadline_s`` from the first attempt."""
        attempt = 0
        end = time.monotonic() + self.deadline_s
        while True:
            if cutoff is not None and cutoff.expired:
                return None, _LATE
            try:
                budget = min(self.timeout_s, end - time.monotonic())
                if budget <= 0:
                    raise _Failure(f"deadline_s={self.deadline_s:g} passed before attempt {attempt + 1}",
                                   retriable=False)
                return self._post_once(data, budget, cutoff), None
            except _Failure as f:
                if cutoff is not None and cutoff.expired:
                    return None, _LATE
                delay = self.backoff_s * (2.0 ** attempt)
                if f.retry_after is not None and f.retry_after > delay:
                    delay = min(f.retry_after, _MAX_RETRY_AFTER_S)
                # A retry is worth starting only if it has time left after its backoff.
                if f.retriable and attempt < self.retries and time.monotonic() + delay < end:
                    logger.debug("judge %s: %s; retry %d/%d in %.2fs", where,
                                 self._redact(f.reason), attempt + 1, self.retries, delay)
                    self._bump(retried=1)
                    attempt += 1
                    if delay > 0:
                        if cutoff is None:
                            time.sleep(delay)
                        else:
                            cutoff.event.wait(delay)
                    continue
                self._bump(failed=1)
                tries = attempt + 1
                logger.warning("judge request failed (%s, %d attempt%s) at %s: %s",
                               where, tries, "" if tries == 1 else "s", self.url,
                               self._redact(f.reason))
                return None, self._redact(f.reason)

    def served_models(self) -> list[str]:
        """Model ids of the server's ``GET /v1/models``.

        Raises:
          RuntimeError: naming the HTTP status or connection error (API key redacted).
        """
        headers = {"Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        url = self.base_url + "/v1/models"
        try:
            with self._opener.open(urllib.request.Request(url, headers=headers), timeout=self.timeout_s) as resp:
                obj = json.loads(resp.read().decode("utf-8"))
            return [str(m["id"]) for m in obj["data"]]
        except urllib.error.HTTPError as e:
            e.close()
            raise RuntimeError(f"HTTP {e.code} from GET {url}") from None
        except (OSError, http.client.HTTPException) as e:
            raise RuntimeError(self._redact(f"GET {url}: {type(e).__name__}: {e}")[:300]) from None
        except (ValueError, KeyError, TypeError) as e:
            raise RuntimeError(f"malformed reply to GET {url} (no OpenAI model list): {type(e).__name__}") from None

    def complete(self, text: str, image_urls: Sequence[str], where: str = "request"
                 ) -> tuple[Optional[str], Optional[str]]:
        """One chat request (images first, then ``text``) with this client's retries.

        Returns (reply text, None), or (None, failure reason); counted in :attr:`stats`.
        """
        self._bump(requests=1)
        return self._request(self._payload(text, image_urls), where)

    def _judge(self, prompt: str, url1: str, url2: str, where: str,
               cutoff: Optional[_Watch] = None) -> tuple[float, Optional[str]]:
        """(score of Image 1 in {0, .5, 1}, failure reason, ``_LATE`` or None);
        late judgments are counted by their round."""
        self._bump(requests=1)
        text = self.prompt_template.replace(_PROMPT_FIELD, prompt)
        text, error = self._request(self._payload(text, (url1, url2)), where, cutoff)
        if error is _LATE:
            return 0.5, _LATE
        if text is None:
            self._bump(ties=1)
            logger.warning("judge %s scored a tie: no answer", where)
            return 0.5, error
        score = parse_preference(text)
        if score is None:
            self._bump(unparseable=1, ties=1)
            snippet = " ".join(self._redact(text).split())[-160:]  # redact, then truncate
            logger.warning("judge answer unparseable (%s): ...%r -> tie", where, snippet)
            return 0.5, None
        return score, None

    def _raise_if_all_failed(self, errors: Sequence[Optional[str]]) -> None:
        """An unreachable judge must not turn silently into ties or NaNs."""
        if errors and all(e is not None for e in errors):
            raise JudgeUnavailableError(
                f"all {len(errors)} judge requests to {self.url} failed "
                f"(model {self.model!r}); last error: {errors[-1]}"
            )

    # ----------------------------------------------------------------- API
    def preference_matrix(self, prompts: Sequence[str], images) -> np.ndarray:
        """``[N, G, G]`` float32 matrix of P(image i beats image j | prompt n).

        ``images``: ``[N, G, H, W, 3]``, float in [0, 1] or uint8. One round
        (:meth:`start_round`) with every group submitted at once."""
        arr = self._validate(prompts, images)
        judging = self.start_round(*arr.shape[:2])
        for b, prompt in enumerate(prompts):
            judging.submit(b, prompt, arr[b])
        return judging.result()

    def start_round(self, num_groups: int, group_size: int) -> "JudgeRound":
        """A step's pairwise judging, fed one group at a time (see :class:`JudgeRound`);
        its deadline, ``step_deadline_s``, runs from the first group submitted."""
        if self._closed:
            raise RuntimeError("VLMJudge is closed")
        return JudgeRound(self, num_groups, group_size, self.step_deadline_s)

    def testpoint_scores(self, prompts: Sequence[str], images,
                         testpoints: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Yes/no verdicts on each image's testpoints, one request per image.

        Args:
          prompts: ``N`` captions.
          images: ``[N, H, W, 3]`` in [0, 1].
          testpoints: ``N`` lists of questions (at least one each).

        Returns:
          ``N`` float32 arrays ``[K_n]``: 1.0 (yes), 0.0 (no), NaN where the
          judge gave no usable verdict (failed request or unparseable line;
          counted in :attr:`stats` and logged).

        Raises:
          JudgeUnavailableError: every request failed.
        """
        images = np.asarray(images)
        if images.ndim != 4:
            raise ValueError(f"images must have shape [N, H, W, 3], got {images.shape}")
        arr = self._validate(prompts, images[:, None], min_group=1)[:, 0]
        if len(testpoints) != len(prompts) or any(
                isinstance(tp, str) or not tp or not all(isinstance(q, str) and q.strip() for q in tp)
                for tp in testpoints):
            raise ValueError("testpoints must hold one non-empty list of question strings per prompt")
        t0 = time.perf_counter()
        pool = self._pool()
        urls = list(pool.map(self._encode, arr))

        def run(n: int) -> tuple[np.ndarray, Optional[str]]:
            listing = "\n".join(f"{k + 1}. {q.strip()}" for k, q in enumerate(testpoints[n]))
            text = self.testpoint_template.replace(_PROMPT_FIELD, prompts[n]).replace(
                _TESTPOINTS_FIELD, listing)
            self._bump(requests=1)
            reply, error = self._request(self._payload(text, (urls[n],)), f"image {n}")
            verdicts = parse_testpoints(reply, len(testpoints[n]))
            if reply is not None and None in verdicts:
                self._bump(unparseable=1)
                snippet = " ".join(self._redact(reply).split())[-160:]
                logger.warning("judge answer for image %d has no verdict for testpoint(s) %s: ...%r",
                               n, [k + 1 for k, v in enumerate(verdicts) if v is None], snippet)
            scores = np.array([np.nan if v is None else float(v) for v in verdicts], np.float32)
            return scores, error

        try:
            results = list(pool.map(run, range(len(prompts))))
        finally:
            self._bump(calls=1, wall_s=time.perf_counter() - t0)
        self._raise_if_all_failed([error for _, error in results])
        return [scores for scores, _ in results]
