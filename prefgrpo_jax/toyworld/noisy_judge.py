"""Controlled reward models: one noisy judgement of the verifier, in two forms.

The paper's precondition is a pointwise scorer whose score range is compressed
and whose errors are as large as the real differences within a group. Here both
forms come from one underlying judgement of an image ``x`` with verifier score
``v(x)``::

    q(x) = v(x) + sigma * z(x)

``z`` is a fixed random direction in a 4 x 4 colour-pooled image space, scaled to
unit variance over rendered scenes of the toy world: a systematic error that
depends on the image, so a policy can learn to raise it (as it can exploit a
learned reward model's bias) and that is the same every time an image is judged.
``sigma`` is the noise level, in verifier-score units (the base model's
within-group verifier std is about 0.2).

* ``noisy_pointwise`` (a score, kind pointwise): ``offset + scale * (q + tau * e)``
  with ``scale`` small (the range of an HPS-like scorer) and ``e`` fresh N(0, 1)
  per image and call (the scorer's read noise, ``tau`` = ``read_noise``).
* ``noisy_pairwise`` (a judge, kind pairwise): ``P[i, j] = 1[q_i - q_j + sqrt(2) tau e_ij > 0]``
  (ties 1/2), ``e_ij`` fresh per pair: the same judgement compared directly. Its
  read noise on a difference has the std of the pointwise form's difference of two
  reads, so both forms order every pair correctly with the same probability:
  accuracies are matched by construction (and tested on held-out pairs).

Options of both sources (``config.reward.options[name]``): ``sigma``,
``read_noise`` (0), ``seed`` (0: the direction ``z`` and the read-noise stream;
use the same seed for the two forms to get the same judgement); the pointwise
form also ``offset`` (0.5) and ``scale`` (0.02). Compression leaves the
group-normalised advantage unchanged (it is affine-invariant) except through the
1e-8 in its denominator; it is there so logged scores look like a human
preference scorer's, and so a study can show the advantage does not care.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from prefgrpo_jax.rewards import registry
from prefgrpo_jax.toyworld.reward import verifier_scores

POOL = 4  # z sees the image as a POOL x POOL grid of mean colours
CALIBRATION_SCENES = 512  # rendered scenes that fix z's unit variance


def pooled_features(images: np.ndarray) -> np.ndarray:
    """Images ``[..., H, W, 3]`` (H, W divisible by POOL) -> mean colour per cell ``[..., POOL*POOL*3]``."""
    x = np.asarray(images, np.float64)
    h, w = x.shape[-3:-1]
    if h % POOL or w % POOL:
        raise ValueError(f"noisy judge: image size {h}x{w} must be divisible by {POOL} "
                         f"(config.train.height / width)")
    x = x.reshape(*x.shape[:-3], POOL, h // POOL, POOL, w // POOL, 3).mean(axis=(-4, -2))
    return x.reshape(*x.shape[:-3], POOL * POOL * 3)


class JudgementError:
    """The fixed image-dependent error ``z(x)``: unit variance over rendered toy scenes.

    ``z(x) = (w . f(x) - mu) / s`` with ``f`` the pooled colours, ``w`` a unit
    random vector from ``seed`` and ``mu``, ``s`` the mean and std of ``w . f``
    over :data:`CALIBRATION_SCENES` random training scenes rendered at ``size``.
    """

    def __init__(self, seed: int, size: int):
        from prefgrpo_jax.toyworld.render import render_batch
        from prefgrpo_jax.toyworld.scenes import sample_prompt, sample_scene

        rng = np.random.default_rng([int(seed), 1])
        w = rng.standard_normal(POOL * POOL * 3)
        self.w = w / np.linalg.norm(w)
        scenes = [sample_scene(sample_prompt(rng), rng) for _ in range(CALIBRATION_SCENES)]
        proj = pooled_features(render_batch(scenes, size)) @ self.w
        self.mu, self.s = float(proj.mean()), float(proj.std())

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Images ``[..., H, W, 3]`` -> ``z [...]`` (fp64)."""
        return (pooled_features(images) @ self.w - self.mu) / self.s


class NoisyJudge:
    """The underlying judgement ``q = v + sigma z`` plus the forms' read noise.

    One instance per reward source. Read noise is drawn from a stream keyed by
    ``(seed, the judged values, how often these exact values were judged before)``:
    reproducible from the seed, fresh when the same images are judged again, and
    independent of how many calls came before, so a resumed run draws what an
    uninterrupted one would.
    """

    def __init__(self, sigma: float, read_noise: float = 0.0, seed: int = 0):
        if not sigma >= 0:
            raise ValueError(f"noisy judge: sigma must be >= 0, got {sigma} "
                             f"(config.reward.options.<noisy source>.sigma)")
        if not read_noise >= 0:
            raise ValueError(f"noisy judge: read_noise must be >= 0, got {read_noise} "
                             f"(config.reward.options.<noisy source>.read_noise)")
        self.sigma, self.read_noise, self.seed = float(sigma), float(read_noise), int(seed)
        self._errors: dict[int, JudgementError] = {}
        self._seen: dict[int, int] = {}

    def _rng(self, q: np.ndarray) -> np.random.Generator:
        key = zlib.crc32(np.ascontiguousarray(q, np.float64).tobytes())
        self._seen[key] = self._seen.get(key, 0) + 1
        return np.random.default_rng([self.seed, 2, key, self._seen[key]])

    def judgement(self, verifier: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Verifier scores ``[N, G]`` and their images ``[N, G, H, W, 3]`` -> ``q [N, G]`` (fp64)."""
        size = int(np.shape(images)[-2])
        if size not in self._errors:
            self._errors[size] = JudgementError(self.seed, size)
        return np.asarray(verifier, np.float64) + self.sigma * self._errors[size](images)

    def point_from(self, q: np.ndarray, offset: float = 0.5, scale: float = 0.02) -> np.ndarray:
        """Judgements ``[N, G]`` -> compressed pointwise scores ``[N, G]`` with fresh read noise."""
        e = self._rng(q).standard_normal(np.shape(q))
        return offset + scale * (q + self.read_noise * e)

    def pair_from(self, q: np.ndarray) -> np.ndarray:
        """Judgements ``[N, G]`` -> ``P [N, G, G]``: hard comparisons with matched read noise.

        Each unordered pair is judged once (``P[j, i] = 1 - P[i, j]``, diagonal 1/2),
        like a judge asked once per pair.
        """
        q = np.asarray(q, np.float64)
        n, g = q.shape
        d = q[:, :, None] - q[:, None, :]
        e = self._rng(q).standard_normal((n, g, g))
        e = np.triu(e, 1) - np.transpose(np.triu(e, 1), (0, 2, 1))  # antisymmetric: one draw per pair
        d = d + np.sqrt(2.0) * self.read_noise * e
        return np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5))


def pair_accuracy(order: np.ndarray, verifier: np.ndarray) -> tuple[float, int]:
    """Fraction of within-group pairs the verifier orders strictly that ``order`` orders alike.

    ``order``: scores ``[N, G]`` or ``P [N, G, G]`` (``P > 1/2``: i preferred);
    ``verifier``: ``[N, G]``. A tie of ``order`` counts 1/2. Returns (accuracy, pairs).
    """
    order, verifier = np.asarray(order, np.float64), np.asarray(verifier, np.float64)
    pred = np.sign(order[:, :, None] - order[:, None, :]) if order.ndim == 2 else np.sign(order - 0.5)
    want = np.sign(verifier[:, :, None] - verifier[:, None, :])
    iu = np.triu_indices(verifier.shape[1], 1)
    pred, want = pred[:, iu[0], iu[1]], want[:, iu[0], iu[1]]
    keep = want != 0
    if not keep.any():
        return float("nan"), 0
    hit = np.where(pred == want, 1.0, np.where(pred == 0, 0.5, 0.0))
    return float(hit[keep].mean()), int(keep.sum())


def noisy_pointwise(name: str = "noisy_pointwise", sigma: float = 0.2, read_noise: float = 0.0,
                    seed: int = 0, offset: float = 0.5, scale: float = 0.02) -> registry.RewardSource:
    """The pointwise form: ``fn(prompts [N], images [N, G, H, W, 3]) -> scores [N, G]``."""
    judge = NoisyJudge(sigma, read_noise, seed)

    def fn(prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
        return judge.point_from(judge.judgement(verifier_scores(prompts, images), images), offset, scale)

    return registry.pointwise_source(name, fn)


def noisy_pairwise(name: str = "noisy_pairwise", sigma: float = 0.2, read_noise: float = 0.0,
                   seed: int = 0) -> registry.RewardSource:
    """The pairwise form: ``fn(prompts [N], images [N, G, H, W, 3]) -> P [N, G, G]``."""
    judge = NoisyJudge(sigma, read_noise, seed)

    def fn(prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
        return judge.pair_from(judge.judgement(verifier_scores(prompts, images), images))

    return registry.pairwise_source(name, fn)


for _name, _factory in (("noisy_pointwise", noisy_pointwise), ("noisy_pairwise", noisy_pairwise)):
    if _name not in registry.known_rewards():
        registry.register_reward(_name, _factory)
