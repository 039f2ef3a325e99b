"""The toy-world study: does a pairwise win rate resist reward hacking better than a score?

    python experiments/toyworld/train_proxies.py     # once: the two learned proxy reward models
    nice -n 19 python experiments/toyworld/study.py  # the full study (5 seeds x 9 arms)

From the same base model (``prefgrpo_jax/toyworld/assets/base``) and the same
budget (steps, prompts per step, group size, SDE sampler, optimiser), the real
``prefgrpo_jax.train.Trainer`` runs GRPO with these rewards, ``--seeds`` each.
The default budget is the testbed of ``experiments/results/toyworld_power.md``:
16 prompts x 16 images per update, SDE noise in one window step (the group
shares its initial noise, so all its reward differences come from that step)
which is the step trained, one on-policy update, every dimension equally often,
lr 2e-4, 40 steps (45 runs in ~1.5 h on 2 idle cores; 80 steps gained more on
the verifier, +2.5 vs +1.6 points over 5 seeds, at twice the cost); the first testbed (configs/tiny.py's objective, 8 x 8 images, 5 of 9
noisy steps trained) barely learned even on the verifier itself (+2.2 +- 1.7
held-out points in the first study, flat per-dimension training scores).

* ``verifier``: the toy verifier itself (``--oracle``; the upper bound, and the
  testbed's power: a method difference smaller than its gain cannot be seen);
* ``pointwise`` / ``pairwise``: the learned proxies' score / within-group win rate;
* ``noisy_pointwise@s`` / ``noisy_pairwise@s`` for each noise level ``s`` of
  ``--noise``: one noisy judgement of the verifier
  (``prefgrpo_jax/toyworld/noisy_judge.py``) as a compressed score or as win
  rates, with matched pair accuracy: the paper's precondition, controlled.

Per step the study logs, for every reward source against the verifier on the
same rollout (``prefgrpo_jax/toyworld/mechanism.py``): ``mech/corr/<source>``
(correlation of the normalised advantages), ``mech/noise_share/<source>`` (share
of advantage variance among images the verifier scores equally) and
``mech/amplification/<source>`` (advantage spread over raw score spread: the
paper's illusory-advantage statistic). The decision rule (:data:`DECISION_RULE`,
>= 5 seeds, t intervals) is fixed here, before any run, and the conclusion in
``<tag>.md`` is generated from the data by :func:`decide`.

Both proxies (``experiments/toyworld/train_proxies.py``) are trained on the
same noisy verifier-labelled pairs of base-model images; they are imperfect on
purpose. Every arm also computes the other sources at weight 0, so all arms
are measured the same way. Per step (on the training rollouts):

* ``reward/<source>/reward_mean``: the verifier score (``reward_mean``), the
  pointwise proxy's score, the pairwise proxy's win rate (always 0.5);
* ``verifier/<dimension>``: verifier score per prompt dimension;
* ``reward/<source>/group_std`` and ``reward/<source>/adv_spread``: the
  within-group std of the training reward and the spread (max - min) of the
  normalised advantages it turns into: the "illusory advantage" is a tiny
  std with an unchanged spread;
* ``fidelity/<source>``: the fraction of within-group pairs the verifier
  orders strictly that the source orders the same way, i.e. how often the
  sign of an advantage difference is real (0.5 = chance);
* ``diversity/pixel_rms``: the mean RMS pixel distance between the images of
  a group.

Held-out evaluations (the eval set of ``prefgrpo_jax.evaluate``: ODE sampler,
fixed noise, ``--eval_per_dim`` prompts per dimension) of the base model and
of every run at its end (``--eval_every`` adds earlier ones) give the per-dimension verifier table,
the pointwise proxy's mean score, the pairwise proxy's preference for the
run's image over the base model's image of the same prompt and noise, and the
verifier's (win 1, tie 1/2). With ``--official_eval=1``,
``prefgrpo_jax.evaluate.evaluate`` also scores each run's final checkpoint (the
official eval mode; checked equal to the in-loop final evaluation in the earlier
studies, so the default skips its ~15 s per run).

Reward hacking shows as a proxy's reward (or its preference for the trained
images) rising while the verifier score falls or stalls. Outputs:
``<results>/<tag>.json`` (every curve of every run, the evaluation tables,
configs, wall times, machine), ``<tag>.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ASSETS = REPO / "prefgrpo_jax" / "toyworld" / "assets"
RESULTS = REPO / "experiments" / "results"
# Arm kinds; the two noisy-judge kinds run once per noise level, as "<kind>@<sigma>".
ARMS = ("verifier", "pointwise", "pairwise", "noisy_pointwise", "noisy_pairwise")
NOISY = ("noisy_pointwise", "noisy_pairwise")
ARM_LABELS = {
    "pointwise": "GRPO, learned pointwise proxy score",
    "pairwise": "Pref-GRPO, learned pairwise proxy win rate",
    "verifier": "GRPO, verifier (upper bound)",
    "noisy_pointwise": "GRPO, noisy judge as a compressed score",
    "noisy_pairwise": "Pref-GRPO, noisy judge as win rates",
}
ARM_COLOURS = {"pointwise": "tab:red", "pairwise": "tab:blue", "verifier": "tab:green",
               "noisy_pointwise": "tab:orange", "noisy_pairwise": "tab:purple"}


def parse_arm(arm: str) -> tuple[str, float | None]:
    """``"noisy_pairwise@0.2"`` -> ``("noisy_pairwise", 0.2)``; ``"verifier"`` -> ``("verifier", None)``."""
    kind, _, sigma = arm.partition("@")
    if kind not in ARMS or (kind in NOISY) != bool(sigma):
        raise ValueError(f"unknown arm {arm!r}: one of {ARMS[:3]} or <{'|'.join(NOISY)}>@<noise level>")
    return kind, (float(sigma) if sigma else None)


def expand_arms(kinds: list[str], noise: list[float]) -> list[str]:
    """Arm kinds (``--arms``) x noise levels (``--noise``) -> arm keys, noisy kinds once per level."""
    out = []
    for kind in kinds:
        if kind not in ARMS:
            raise ValueError(f"--arms: unknown arm {kind!r}; known: {ARMS}")
        out += [f"{kind}@{s:g}" for s in noise] if kind in NOISY else [kind]
    return out


def arm_colour(arm: str) -> str:
    return ARM_COLOURS[parse_arm(arm)[0]]


def file_stem(arm: str) -> str:
    """An arm key as a file-name part (``noisy_pairwise@0.2`` -> ``noisy_pairwise_s0.2``)."""
    return arm.replace("@", "_s")


def arm_label(arm: str) -> str:
    kind, sigma = parse_arm(arm)
    return ARM_LABELS[kind] + (f", noise {sigma:g}" if sigma is not None else "")


def load_tiny_config():
    """``configs/tiny.py``'s config (loaded by path, as the tests do)."""
    spec = importlib.util.spec_from_file_location("tiny_config", REPO / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(ASSETS / "base"), help="base model (diffusers FLUX dir)")
    p.add_argument("--prompts", default=str(ASSETS / "prompts_train.jsonl"))
    p.add_argument("--prompt_mix", choices=("file", "balanced"), default="balanced",
                   help="balanced: every dimension equally often in the training stream (the shipped "
                        "file is 79%% position prompts, while the held-out score weighs the five "
                        "dimensions equally); file: the prompt file's own mix")
    p.add_argument("--proxies", default=str(ASSETS),
                   help="directory holding reward_pairwise/ and reward_pointwise/ (train_proxies.py)")
    p.add_argument("--results", default=str(RESULTS), help="where <tag>.json/.md and PNGs go")
    p.add_argument("--tag", default="toyworld_study", help="file-name stem of the outputs")
    p.add_argument("--workdir", default="/tmp/toyworld_study", help="scratch: run workdirs, checkpoints")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--noise", default="0.1,0.2,0.4",
                   help="noise levels (sigma, verifier-score units) of the noisy-judge arms; the base "
                        "model's within-group verifier std is ~0.2")
    p.add_argument("--seeds", default="0,1,2,3,4", help=">= 5 for the decision rule to apply")
    p.add_argument("--steps", type=int, default=40,
                   help="GRPO updates per run (the verifier arm: +1.6 held-out points at 40, +2.5 at 80, "
                        "-0.2 at 120; lr 4e-4 collapsed after ~50)")
    # The testbed with power (experiments/results/toyworld_power.md, setting w1_b256_*): 256
    # images per update, noise in one window step, that step trained, one on-policy update.
    p.add_argument("--prompts_per_step", type=int, default=16)
    p.add_argument("--group_size", type=int, default=16)
    p.add_argument("--sample_steps", type=int, default=10, help="SDE steps per rollout")
    p.add_argument("--timestep_fraction", type=float, default=1.0)
    p.add_argument("--timestep_chunk", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4,
                   help="AdamW lr (with the first testbed's 64 images per update, 1e-4 moved nothing "
                        "and 3e-4 collapsed the model)")
    p.add_argument("--clip_range", type=float, default=None, help="default: configs/tiny.py's")
    p.add_argument("--updates_per_rollout", type=int, default=1,
                   help="1: on-policy (with configs/tiny.py's 2 the clip never acted: the policy ratio "
                        "stayed within 0.999-1.001; 4 gave -2.6 held-out points)")
    p.add_argument("--eta", type=float, default=None, help="SDE noise level; default: configs/tiny.py's")
    p.add_argument("--sde_window", type=int, default=1,
                   help="Flow-GRPO-Fast: noise only in a window of this many steps (ODE elsewhere), only "
                        "they are trained; 0: every step stochastic")
    p.add_argument("--sde_window_range", default="0,3",
                   help="lo,hi: the window starts uniformly in [lo, hi - sde_window] per rollout")
    p.add_argument("--warmup_steps", type=int, default=None,
                   help="linear lr warmup over this many optimizer updates; default: configs/tiny.py's")
    p.add_argument("--rationorm", type=int, choices=(0, 1), default=None, help="default: configs/tiny.py's")
    p.add_argument("--oracle", choices=("verifier", "verifier_pairwise"), default="verifier",
                   help="reward of the upper-bound arm: pointwise score or its hard win rates")
    p.add_argument("--eval_per_dim", type=int, default=50,
                   help="held-out prompts per dimension (50: all 250; 16 gave a +-1.7-point seed spread)")
    p.add_argument("--eval_steps", type=int, default=20, help="ODE steps of the held-out evaluation")
    p.add_argument("--eval_every", type=int, default=None,
                   help="held-out evaluation every this many steps (default: only at the end)")
    p.add_argument("--official_eval", type=int, default=0,
                   help="1: also run prefgrpo_jax.evaluate.evaluate on each final checkpoint")
    p.add_argument("--smooth", type=int, default=5, help="moving-average window of the plotted curves")
    p.add_argument("--plots", type=int, default=1)
    p.add_argument("--render_only", type=int, default=0,
                   help="1: rewrite <tag>.md and the json-based plots from an existing <tag>.json, no runs")
    p.add_argument("--keep_workdirs", type=int, default=0, help="1: keep run workdirs (checkpoints)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- #
# Configs
# --------------------------------------------------------------------------- #


def arm_spec(arm: str, oracle: str) -> dict[str, float]:
    """Reward spec of an arm: its training source at weight 1, the others at 0 (measured).

    A noisy-judge arm also measures the other form of its judgement (same noise level)."""
    kind, _ = parse_arm(arm)
    spec = {"pointwise_model": 0.0, "pairwise_model": 0.0, "verifier": 0.0}
    if kind in NOISY:
        spec.update({k: 0.0 for k in NOISY})
    spec[training_source(arm, oracle)] = 1.0
    return spec


def training_source(arm: str, oracle: str) -> str:
    kind, _ = parse_arm(arm)
    return {"pointwise": "pointwise_model", "pairwise": "pairwise_model", "verifier": oracle}.get(kind, kind)


def balanced_prompt_file(src: str | Path, dst: Path) -> Path:
    """Writes ``dst``: the prompts of ``src`` (jsonl with ``prompt``) with each dimension's
    prompts cycled, in file order, to the count of the largest dimension; returns ``dst``.

    The training stream samples file rows uniformly, so every dimension then gets an
    equal share of the groups (the held-out score is the unweighted mean over dimensions).
    """
    from prefgrpo_jax.toyworld.scenes import DIMENSIONS

    rows = [json.loads(line) for line in Path(src).read_text().splitlines() if line.strip()]
    by_dim: dict[str, list[str]] = {}
    for r in rows:
        by_dim.setdefault(_dimension(r["prompt"]), []).append(r["prompt"])
    n = max(len(v) for v in by_dim.values())
    out = [{"prompt": by_dim[d][i % len(by_dim[d])], "category": d}
           for d in DIMENSIONS if d in by_dim for i in range(n)]
    dst.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in out)
    if not dst.exists() or dst.read_text() != text:  # concurrent runs share one file
        dst.write_text(text)
    return dst


def arm_config(args: argparse.Namespace, arm: str, seed: int):
    """``configs/tiny.py`` with the study's budget, the arm's reward and the seed."""
    import ml_collections

    c = load_tiny_config()
    c.seed = int(seed)
    c.model.path = str(args.base)
    c.data.prompts = str(args.prompts if args.prompt_mix == "file"
                         else balanced_prompt_file(args.prompts, Path(args.workdir) / "prompts_balanced.jsonl"))
    c.total_steps = int(args.steps)
    c.checkpoint_every = int(args.steps)  # only the final state is saved
    c.keep_checkpoints = 1
    c.image_every = 0
    t = c.train
    t.prompts_per_step = int(args.prompts_per_step)
    t.group_size = int(args.group_size)
    t.num_steps = int(args.sample_steps)
    t.timestep_fraction = float(args.timestep_fraction)
    t.timestep_chunk = int(args.timestep_chunk)
    if args.lr is not None:
        c.optim.learning_rate = float(args.lr)
    if args.clip_range is not None:
        t.clip_range = float(args.clip_range)
    if args.updates_per_rollout is not None:
        t.updates_per_rollout = int(args.updates_per_rollout)
    if args.eta is not None:
        t.eta = float(args.eta)
    t.sde_window = int(args.sde_window)
    if args.sde_window:
        t.sde_window_range = tuple(int(v) for v in args.sde_window_range.split(","))
    if args.warmup_steps is not None:
        c.optim.warmup_steps = int(args.warmup_steps)
    if args.rationorm is not None:
        t.rationorm = bool(args.rationorm)
    c.reward.spec = arm_spec(arm, args.oracle)
    c.reward.monitor = "verifier"
    proxies = Path(args.proxies)
    options = {"pairwise_model": {"path": str(proxies / "reward_pairwise")},
               "pointwise_model": {"path": str(proxies / "reward_pointwise")}}
    _, sigma = parse_arm(arm)
    if sigma is not None:  # both forms: the same judgement (same seed), the run's seed
        options.update({k: {"sigma": sigma, "seed": int(seed)} for k in NOISY})
    c.reward.options = ml_collections.ConfigDict(options)
    c.eval.prompts_per_dimension = int(args.eval_per_dim)
    c.eval.num_steps = int(args.eval_steps)
    c.eval.batch_size = 5 * int(args.eval_per_dim)  # one batch: all held-out prompts
    return c


# --------------------------------------------------------------------------- #
# Measurements
# --------------------------------------------------------------------------- #


def group_diversity(images: np.ndarray) -> float:
    """Mean over groups and pairs ``i < j`` of the RMS pixel distance; ``images [N, G, H, W, 3]``."""
    x = np.asarray(images, np.float64).reshape(images.shape[0], images.shape[1], -1)
    sq = np.sum(x * x, axis=-1)
    d2 = sq[:, :, None] + sq[:, None, :] - 2 * np.einsum("ngd,nhd->ngh", x, x)
    rms = np.sqrt(np.maximum(d2, 0.0) / x.shape[-1])
    iu = np.triu_indices(x.shape[1], 1)
    return float(rms[:, iu[0], iu[1]].mean())


def pair_fidelity(output: np.ndarray, truth: np.ndarray) -> tuple[float, int]:
    """How often a source (scores ``[N, G]`` or ``P [N, G, G]``) orders a group's pairs as the
    verifier (``truth [N, G]``) does: :func:`prefgrpo_jax.toyworld.noisy_judge.pair_accuracy`."""
    from prefgrpo_jax.toyworld.noisy_judge import pair_accuracy

    return pair_accuracy(output, truth)


def source_advantages(output: np.ndarray, ddof: int) -> tuple[np.ndarray, np.ndarray]:
    """A source's output (scores ``[N, G]`` or ``P [N, G, G]``) -> (reward, group-normalised advantage), ``[N, G]`` each."""
    from prefgrpo_jax.rewards.advantages import normalized_advantages, win_rates

    r = np.asarray(win_rates(np.float32(output)) if np.ndim(output) == 3 else output, np.float32)
    return r, np.asarray(normalized_advantages(r, "group", ddof=ddof), np.float64)


def mechanism_metrics(captured: dict[str, np.ndarray], ddof: int) -> dict[str, float]:
    """Per source of one rollout: its advantages against the verifier's (``mech/<metric>/<source>``).

    ``captured``: source -> output on the same images, ``verifier`` among them.
    """
    from prefgrpo_jax.toyworld.mechanism import advantage_correlation, amplification, noise_share

    truth = np.asarray(captured["verifier"], np.float64)
    _, truth_adv = source_advantages(truth, ddof)
    m = {}
    for name, out in captured.items():
        r, adv = source_advantages(out, ddof)
        m[f"mech/amplification/{name}"] = amplification(adv, r)
        if name != "verifier":
            m[f"mech/corr/{name}"] = advantage_correlation(adv, truth_adv)
            m[f"mech/noise_share/{name}"] = noise_share(adv, truth)
    return m


def _dimension(prompt: str) -> str:
    from prefgrpo_jax.toyworld.scenes import parse_prompt

    return parse_prompt(prompt).dimension


class Proxies:
    """The two proxy reward models, for scoring held-out images outside the Trainer."""

    def __init__(self, directory: str | Path):
        import jax

        from prefgrpo_jax.rewards.pairwise import load_reward_model, split_reward_model

        self.pair_model, self.tok = load_reward_model(Path(directory) / "reward_pairwise")
        self.point_model, self.point_tok = load_reward_model(Path(directory) / "reward_pointwise")
        pf, pp = split_reward_model(self.pair_model)
        sf, sp = split_reward_model(self.point_model)
        self._pair = jax.jit(lambda ids, m, a, b: pf.merge(pp).pair_logits_from_inputs(ids, m, a, b))
        self._score = jax.jit(lambda ids, m, x: sf.group_reward(sp, ids, m, x[:, None])[:, 0])

    def point_scores(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        ids, mask = self.point_tok(prompts)
        return np.asarray(self._score(ids, mask, np.asarray(images, np.float32)))

    def pair_prob(self, prompts: list[str], a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """P(a preferred over b) per prompt, from the pairwise proxy."""
        import jax

        ids, mask = self.tok(prompts)
        logits = self._pair(ids, mask, np.asarray(a, np.float32), np.asarray(b, np.float32))
        return np.asarray(jax.nn.sigmoid(logits))


def train_eval_prompts(config, n_per_dim: int, seed: int = 0) -> list[str]:
    """A fixed sample of ``n_per_dim`` prompts per dimension from the TRAINING prompt file
    (in-distribution evaluation: the prompts GRPO optimises on)."""
    from prefgrpo_jax.toyworld.scenes import DIMENSIONS

    path = Path(config.data.prompts)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.suffix == ".jsonl" else [{"prompt": line.strip()} for line in path.read_text().splitlines() if line.strip()]
    by_dim: dict[str, list[str]] = {}
    for r in rows:
        by_dim.setdefault(_dimension(r["prompt"]), []).append(r["prompt"])
    rng = np.random.default_rng(seed)
    out = []
    for d in DIMENSIONS:
        pool = by_dim.get(d, [])
        if pool:
            out += [pool[i] for i in sorted(rng.choice(len(pool), size=min(n_per_dim, len(pool)), replace=False))]
    return out


def heldout_eval(pipe, config, proxies: Proxies, base_images: np.ndarray | None = None,
                 train_prompts: list[str] | None = None) -> tuple[dict, np.ndarray]:
    """The evaluation of ``prefgrpo_jax.evaluate.evaluate`` (same prompts, sampler and
    noise) on ``pipe``'s current weights, plus the proxies' view of the images; with
    ``train_prompts`` also the verifier table on those (in-distribution) prompts."""
    import jax

    from prefgrpo_jax import evaluate
    from prefgrpo_jax.toyworld.verify import score_table, verify

    specs = evaluate.heldout_set(config)
    prompts = [s.text for s in specs]
    images = evaluate.generate(pipe, prompts, config, jax.random.key(int(config.eval.seed)))
    results = [verify(img, spec) for img, spec in zip(images, specs)]
    table = score_table(results, specs)
    scores = np.asarray([r["score"] for r in results])
    out = {"table": table, "pointwise_proxy_mean": float(proxies.point_scores(prompts, images).mean())}
    if base_images is not None:
        p = proxies.pair_prob(prompts, images, base_images)
        base_scores = np.asarray([verify(img, spec)["score"] for img, spec in zip(base_images, specs)])
        out["pairwise_proxy_pref_over_base"] = float(p.mean())
        out["verifier_winrate_over_base"] = float(np.mean(
            np.where(scores > base_scores, 1.0, np.where(scores == base_scores, 0.5, 0.0))))
        out["pixel_rms_to_base"] = float(np.sqrt(np.mean((images - base_images) ** 2)))
    if train_prompts:
        timgs = evaluate.generate(pipe, train_prompts, config, jax.random.key(int(config.eval.seed) + 1))
        out["train_prompts_table"] = score_table([verify(i, p) for i, p in zip(timgs, train_prompts)],
                                                 list(train_prompts))
        out["train_prompts_pointwise_proxy_mean"] = float(proxies.point_scores(train_prompts, timgs).mean())
    return out, images


def make_study_trainer(eval_at: set[int], proxies: Proxies, base_images: np.ndarray,
                       train_prompts: list[str] | None = None, judge_error=None, sigma: float = 0.0):
    """A ``Trainer`` subclass that adds the study's per-step measurements and held-out evals.

    ``judge_error``: a noisy-judge arm's fixed error ``z`` (``noisy_judge.JudgementError``)
    and ``sigma`` its level: held-out evals then report how many verifier points of the
    judge's view of the change are its own error (``judge_error_delta``).
    """
    from prefgrpo_jax.rewards.registry import RewardSource
    from prefgrpo_jax.train import Trainer

    class StudyTrainer(Trainer):
        def __init__(self, config, workdir):
            super().__init__(config, workdir)
            self.captured: dict[str, np.ndarray] = {}
            for name, src in list(self.reward.sources.items()):
                self.reward.sources[name] = RewardSource(name, src.kind, self._capture(name, src.fn))
            self.evals: dict[int, dict] = {}
            self.eval_images: dict[int, np.ndarray] = {}
            self.group_images: dict[int, tuple[list[str], np.ndarray]] = {}

        def _capture(self, name, fn):
            def wrapped(prompts, images):
                out = np.asarray(fn(prompts, images), np.float32)
                self.captured[name] = out
                return out
            return wrapped

        def evaluate_now(self, step: int) -> None:
            self.pipe.with_transformer_params(self.state["params"])
            res, images = heldout_eval(self.pipe, self.config, proxies, base_images, train_prompts)
            if judge_error is not None:
                res["judge_error_delta"] = float(sigma * (judge_error(images).mean()
                                                          - judge_error(base_images).mean()))
            self.evals[step] = res
            self.eval_images[step] = images

        def step(self, step: int) -> dict[str, Any]:
            t0 = time.perf_counter()
            m = super().step(step)
            prompts, images = self._last_images
            truth = self.captured["verifier"]
            m["diversity/pixel_rms"] = group_diversity(images)
            for name, out in self.captured.items():
                fid, n = pair_fidelity(out, truth)
                if name != "verifier":
                    m[f"fidelity/{name}"] = fid
            m.update(mechanism_metrics(self.captured, int(self.config.train.adv_ddof)))
            m["fidelity/strict_pairs_frac"] = n / (len(prompts) * images.shape[1] * (images.shape[1] - 1) / 2)
            dims: dict[str, list[float]] = {}
            for p, row in zip(prompts, truth):
                dims.setdefault(_dimension(p), []).extend(row.tolist())
            for d, v in dims.items():
                m[f"verifier/{d}"] = float(np.mean(v))
            done = step + 1
            if done == 1 or done == self.config.total_steps:
                self.group_images[done] = (list(prompts), np.asarray(images[:2]))
            if done in eval_at:
                t1 = time.perf_counter()
                self.evaluate_now(done)
                m["heldout_eval_s"] = time.perf_counter() - t1
            m["study_overhead_s"] = time.perf_counter() - t0 - m["step_time_s"]
            return m

    return StudyTrainer


# --------------------------------------------------------------------------- #
# Summaries
# --------------------------------------------------------------------------- #


def _values(curve: list[dict], key: str) -> list[float]:
    return [r[key] for r in curve if key in r and r[key] is not None and np.isfinite(r[key])]


def _window(curve: list[dict], key: str, first: bool, n: int) -> float:
    vals = _values(curve, key)
    if not vals:
        return float("nan")
    n = max(1, min(n, len(vals) // 2 or 1))
    return float(np.mean(vals[:n] if first else vals[-n:]))


def summarise(runs: dict, base_eval: dict, args, oracle: str) -> dict:
    """Per arm: mean / std / values over seeds of the headline numbers."""
    n = max(1, min(10, args.steps // 4))
    out = {}
    for arm, seeds in runs.items():
        src = training_source(arm, oracle)
        per_seed: dict[str, list[float]] = {}

        def add(key, value):
            per_seed.setdefault(key, []).append(float(value))

        for _, run in sorted(seeds.items()):
            c = run["curve"]
            for key, name in (("reward_mean", "train_verifier"),
                              ("reward/pointwise_model/reward_mean", "train_pointwise_proxy"),
                              ("diversity/pixel_rms", "train_diversity"),
                              (f"reward/{src}/group_std", "train_reward_group_std"),
                              (f"reward/{src}/adv_spread", "train_adv_spread")):
                a, b = _window(c, key, True, n), _window(c, key, False, n)
                add(f"{name}_first", a)
                add(f"{name}_last", b)
                add(f"{name}_delta", b - a)
            for fsrc in ("pointwise_model", "pairwise_model"):
                add(f"fidelity_{fsrc}_first", _window(c, f"fidelity/{fsrc}", True, n))
                add(f"fidelity_{fsrc}_last", _window(c, f"fidelity/{fsrc}", False, n))
            # The mechanism, for the arm's own training reward: first / last window and whole run.
            for metric in ("corr", "noise_share", "amplification"):
                key = f"mech/{metric}/{src}"
                add(f"mech_{metric}_first", _window(c, key, True, n))
                add(f"mech_{metric}_last", _window(c, key, False, n))
                add(f"mech_{metric}_mean", float(np.mean(_values(c, key) or [np.nan])))
            final = run["evals"][str(max(int(k) for k in run["evals"]))]
            if "train_prompts_table" in final:
                for d, v in final["train_prompts_table"].items():
                    add(f"trainprompts_{d}_final", v)
                add("trainprompts_overall_delta", final["train_prompts_table"]["overall"]
                    - base_eval["train_prompts_table"]["overall"])
            add("heldout_overall_final", final["table"]["overall"])
            add("heldout_overall_delta", final["table"]["overall"] - base_eval["table"]["overall"])
            add("heldout_pointwise_proxy_delta", final["pointwise_proxy_mean"] - base_eval["pointwise_proxy_mean"])
            add("heldout_pairwise_proxy_pref_over_base", final["pairwise_proxy_pref_over_base"])
            add("heldout_verifier_winrate_over_base", final["verifier_winrate_over_base"])
            if "judge_error_delta" in final:
                add("heldout_judge_error_delta", final["judge_error_delta"])
            for d, v in final["table"].items():
                if d != "overall":
                    add(f"heldout_{d}_final", v)
        out[arm] = {k: {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v)), "values": v}
                    for k, v in per_seed.items()}
        out[arm]["window_steps"] = n
    return out


# --------------------------------------------------------------------------- #
# The decision rule (fixed before the runs; written into the results from the first partial write)
# --------------------------------------------------------------------------- #

MIN_SEEDS = 5
CI_LEVEL = 0.95
DECISION_RULE = (
    "Outcome per run: the final checkpoint's held-out verifier overall minus the base model's, in points "
    "(x100); one value per seed. Intervals: two-sided 95% Student t intervals over seeds (an arm's mean "
    "gain) and Welch t intervals (a difference of two arms' means). "
    "(1) Power: the comparison is only read if the verifier arm (GRPO on the ground truth) gains with its "
    "interval above 0; otherwise the testbed cannot separate the arms and the conclusion is "
    "'inconclusive: no power'. "
    "(2) Controlled comparison, per noise level s: d(s) = mean gain of noisy_pairwise@s - mean gain of "
    "noisy_pointwise@s (the same judgement of the verifier, matched accuracy, differing only in form). "
    "'Pairwise resists hacking better' if d's interval lies above 0 at a majority of the noise levels and "
    "below 0 at none; 'pointwise better' if below 0 at a majority and above at none; otherwise 'no "
    "difference detected' (with the largest interval bound, the size of a difference the study could miss). "
    "(3) The learned proxies (pairwise - pointwise) are compared the same way, as a secondary result. "
    f"(4) With fewer than {MIN_SEEDS} seeds per arm the rule is not applied: the result is labelled a "
    "reduced run and no conclusion is drawn."
)


def t_interval(values: list[float], level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(mean, low, high) of a Student t interval over ``values``; NaN bounds for fewer than 2."""
    from scipy import stats

    x = np.asarray(values, np.float64)
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return m, m - h, m + h


def welch_interval(a: list[float], b: list[float], level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high): Welch's t interval; NaN bounds for fewer than 2 values a side."""
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return d, float("nan"), float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = np.sqrt(va + vb)
    if se == 0:
        return d, d, d
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    h = float(stats.t.ppf(0.5 + level / 2, dof) * se)
    return d, d - h, d + h


def _sign(interval: tuple[float, float, float]) -> int:
    """+1 / -1 when the interval lies above / below 0, else 0."""
    _, lo, hi = interval
    return 1 if lo > 0 else -1 if hi < 0 else 0


def comparison_verdict(intervals: list[tuple[float, float, float]]) -> str:
    """Rule (2) over the per-level intervals of d = pairwise - pointwise."""
    signs = [_sign(i) for i in intervals]
    majority = len(signs) // 2 + 1
    if signs.count(1) >= majority and -1 not in signs:
        return "pairwise resists hacking better"
    if signs.count(-1) >= majority and 1 not in signs:
        return "pointwise better"
    return "no difference detected"


def decide(summary: dict, noise: list[float]) -> dict:
    """The decision rule applied to ``summarise``'s output (gains in points)."""
    def gains(arm):
        return [100 * v for v in summary[arm]["heldout_overall_delta"]["values"]] if arm in summary else None

    out: dict[str, Any] = {"rule": DECISION_RULE, "levels": {}}
    n_seeds = min(len(v["heldout_overall_delta"]["values"]) for v in summary.values())
    out["seeds_per_arm"] = n_seeds
    ver = gains("verifier")
    if ver is not None:
        out["verifier_gain"] = t_interval(ver)
        out["verifier_all_seeds_up"] = bool(all(g > 0 for g in ver))
    for sigma in noise:
        pw, pt = gains(f"noisy_pairwise@{sigma:g}"), gains(f"noisy_pointwise@{sigma:g}")
        if pw is not None and pt is not None:
            out["levels"][f"{sigma:g}"] = {"pairwise": t_interval(pw), "pointwise": t_interval(pt),
                                           "difference": welch_interval(pw, pt)}
    if gains("pairwise") is not None and gains("pointwise") is not None:
        out["learned_difference"] = welch_interval(gains("pairwise"), gains("pointwise"))
    if n_seeds < MIN_SEEDS:
        out["conclusion"] = (f"not applied: {n_seeds} seed(s) per arm, the rule needs >= {MIN_SEEDS} "
                             "(a reduced run; its numbers show the pipeline works, not the answer)")
    elif ver is None or _sign(out["verifier_gain"]) != 1:
        out["conclusion"] = "inconclusive: no power (the verifier arm's gain interval is not above 0)"
    elif not out["levels"]:
        out["conclusion"] = "not applied: no noisy-judge arms were run"
    else:
        verdict = comparison_verdict([v["difference"] for v in out["levels"].values()])
        bound = max(max(abs(v["difference"][1]), abs(v["difference"][2])) for v in out["levels"].values())
        out["conclusion"] = verdict + ("" if verdict != "no difference detected" else
                                       f" (differences up to {bound:.1f} points cannot be excluded)")
    if "learned_difference" in out and n_seeds >= MIN_SEEDS:
        out["learned_verdict"] = comparison_verdict([out["learned_difference"]])
    return out


def _pm(s: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
    if key not in s:
        return "n/a"
    v = s[key]
    return f"{scale * v['mean']:.{digits}f} ± {scale * v['std']:.{digits}f}"


HACKING_RULE = (
    "an arm is flagged as reward hacking when its own proxy says the trained model improved (pointwise "
    "arm: the pointwise proxy's mean score on the held-out images rose over the base model's; pairwise "
    "arm: the pairwise proxy prefers the trained images over the base model's in more than half of the "
    "held-out prompts) while the verifier says it did not (held-out overall score not above the base "
    "model's and verifier win rate over the base model <= 0.5), in the mean over seeds"
)


def is_hacking(arm: str, s: dict) -> bool | None:
    """The rule of :data:`HACKING_RULE` (None for the verifier arm: it optimises the truth)."""
    if arm == "pointwise":
        proxy_up = s["heldout_pointwise_proxy_delta"]["mean"] > 0
    elif arm == "pairwise":
        proxy_up = s["heldout_pairwise_proxy_pref_over_base"]["mean"] > 0.5
    else:
        return None
    verifier_not_up = (s["heldout_overall_delta"]["mean"] <= 0
                       and s["heldout_verifier_winrate_over_base"]["mean"] <= 0.5)
    return bool(proxy_up and verifier_not_up)


def findings(summary: dict) -> list[str]:
    """Statements read off the numbers with a fixed rule (:data:`HACKING_RULE`)."""
    lines = [f"Rule: {HACKING_RULE}.", ""]
    for arm, s in summary.items():
        dv, dp = s["train_verifier_delta"], s["train_pointwise_proxy_delta"]
        hv, hp = s["heldout_overall_delta"], s["heldout_pointwise_proxy_delta"]
        pp = s["heldout_pairwise_proxy_pref_over_base"]
        vw = s["heldout_verifier_winrate_over_base"]
        seeds_down = sum(v < 0 for v in hv["values"])
        seeds_up = sum(v > 0 for v in hv["values"])
        hacked = is_hacking(arm, s)
        verdict = {True: "**Flagged as reward hacking** by the rule.",
                   False: "Not flagged as reward hacking by the rule.", None: ""}[hacked]
        lines.append(
            f"- **{arm_label(arm)}**: verifier score on the training rollouts "
            f"{s['train_verifier_first']['mean']:.3f} -> {s['train_verifier_last']['mean']:.3f} "
            f"(delta {dv['mean']:+.3f} ± {dv['std']:.3f}); pointwise proxy score on them delta "
            f"{dp['mean']:+.3f} ± {dp['std']:.3f}. Held-out: verifier overall {100 * hv['mean']:+.2f} ± "
            f"{100 * hv['std']:.2f} points vs the base model ({seeds_up} seeds above, {seeds_down} below, of "
            f"{len(hv['values'])}), verifier win rate over the base model {vw['mean']:.3f} ± {vw['std']:.3f}; "
            f"pointwise proxy {hp['mean']:+.3f} ± {hp['std']:.3f}; pairwise proxy P(trained > base) "
            f"{pp['mean']:.3f} ± {pp['std']:.3f}."
            + (f" Fixed training prompts: verifier overall {100 * s['trainprompts_overall_delta']['mean']:+.2f} ± "
               f"{100 * s['trainprompts_overall_delta']['std']:.2f} points vs the base model."
               if "trainprompts_overall_delta" in s else "")
            + f" {verdict}"
        )
    return lines


# --------------------------------------------------------------------------- #
# Plots and images
# --------------------------------------------------------------------------- #


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(y) < k:
        return y
    pad = np.concatenate([np.full(k - 1, y[0]), y])
    return np.convolve(pad, np.ones(k) / k, mode="valid")


def plot_curves(runs: dict, args, oracle: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward_mean", "verifier score (training rollouts)", None),
        ("reward/pointwise_model/reward_mean", "pointwise proxy score (training rollouts)", None),
        ("fidelity/{train}", "fidelity of the training reward\n(pairs ordered as the verifier does)", None),
        ("reward/{train}/group_std", "within-group std of the training reward", "log"),
        ("reward/{train}/adv_spread", "advantage spread (max - min) per group", None),
        ("diversity/pixel_rms", "within-group diversity (RMS pixel distance)", None),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title, scale) in zip(axes.flat, panels):
        for arm, seeds in runs.items():
            src = training_source(arm, oracle)
            k = key.format(train=src)
            if k == "fidelity/verifier" or k == f"fidelity/{oracle}":
                continue  # the verifier agrees with itself
            curves = [np.array([r.get(k, np.nan) for r in run["curve"]], float) for run in seeds.values()]
            if not curves or all(np.all(np.isnan(c)) for c in curves):
                continue
            steps = np.array([r["step"] for r in next(iter(seeds.values()))["curve"]])
            y = np.stack([_smooth(c, args.smooth) for c in curves])
            mean = np.nanmean(y, 0)
            ax.plot(steps, mean, color=arm_colour(arm), label=arm_label(arm))
            if len(curves) > 1:
                ax.fill_between(steps, np.nanmin(y, 0), np.nanmax(y, 0), color=arm_colour(arm), alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO step")
        if scale:
            ax.set_yscale(scale)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Toy-world study: {len(next(iter(runs.values())))} seeds per arm (line: mean, band: "
                 f"min-max over seeds; moving average over {args.smooth} steps)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_headline(result: dict, args, path: Path) -> None:
    """What a reader looks at first: held-out gain vs noise level per arm; advantage/verifier
    correlation of each arm's training reward over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decision, summary, noise = result["decision"], result["summary"], result["meta"]["noise"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5))
    for kind in NOISY:
        pts = [(float(sg), lv["pairwise" if kind == "noisy_pairwise" else "pointwise"])
               for sg, lv in decision["levels"].items()]
        if pts:
            x = np.array([p[0] for p in pts])
            m, lo, hi = (np.array([p[1][k] for p in pts]) for k in range(3))
            ax.errorbar(x, m, yerr=[m - lo, hi - m], fmt="o-", capsize=4, color=ARM_COLOURS[kind],
                        label=ARM_LABELS[kind])
    for kind in ("verifier", "pointwise", "pairwise"):
        if kind in summary:
            m, lo, hi = t_interval([100 * v for v in summary[kind]["heldout_overall_delta"]["values"]])
            ax.axhline(m, color=ARM_COLOURS[kind], ls="--", label=ARM_LABELS[kind])
            if np.isfinite(lo):
                ax.axhspan(lo, hi, color=ARM_COLOURS[kind], alpha=0.12)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("noise level sigma of the judge (verifier-score units)")
    ax.set_ylabel("held-out verifier gain over base (points)")
    ax.set_title("Verifier gain vs noise (95% t intervals over seeds; dashed: arms without a noise level)",
                 fontsize=9)
    if noise:
        ax.set_xticks(noise)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for arm, seeds in result["runs"].items():
        key = f"mech/corr/{training_source(arm, args.oracle)}"
        curves = [np.array([r.get(key, np.nan) for r in run["curve"]], float) for run in seeds.values()]
        if arm == "verifier" or not curves:
            continue
        steps = np.array([r["step"] for r in next(iter(seeds.values()))["curve"]])
        _, sigma = parse_arm(arm)
        ls = "-" if sigma is None else ["-", "--", ":", "-."][sorted(noise).index(sigma) % 4]
        bx.plot(steps, np.nanmean(np.stack([_smooth(c, args.smooth) for c in curves]), 0),
                color=arm_colour(arm), ls=ls, label=arm)
    bx.set_xlabel("GRPO step")
    bx.set_ylabel("corr(training advantages, verifier advantages)")
    bx.set_title(f"Advantage/verifier correlation over training (mean over seeds, moving average "
                 f"{args.smooth})", fontsize=9)
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_heldout(runs: dict, base_eval: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("table.overall", "held-out verifier overall"),
            ("train_prompts_table.overall", "verifier overall, training prompts"),
            ("pointwise_proxy_mean", "held-out pointwise proxy score"),
            ("pairwise_proxy_pref_over_base", "pairwise proxy P(run > base)"),
            ("verifier_winrate_over_base", "verifier win rate vs base")]

    def get(ev, k):
        if "." in k:
            table, dim = k.split(".")
            return ev.get(table, {}).get(dim, np.nan)
        return ev.get(k, 0.5)

    fig, axes = plt.subplots(1, 5, figsize=(20, 3.8))
    for ax, (k, title) in zip(axes, keys):
        for arm, seeds in runs.items():
            ys = []
            for run in seeds.values():
                steps = [0] + sorted(int(s) for s in run["evals"])
                ys.append([get(base_eval, k)] + [get(run["evals"][str(s)], k) for s in steps[1:]])
            y = np.array(ys)
            ax.plot(steps, y.mean(0), "o-", color=arm_colour(arm), label=arm_label(arm))
            if len(ys) > 1:
                ax.fill_between(steps, y.min(0), y.max(0), color=arm_colour(arm), alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _tile(img: np.ndarray, scale: int = 3) -> np.ndarray:
    u8 = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return np.kron(u8, np.ones((scale, scale, 1), np.uint8))


def image_grid(rows: list[list[np.ndarray]], row_labels: list[str], col_labels: list[str], path: Path,
               scale: int = 3) -> None:
    """A labelled grid of images (PIL only)."""
    from PIL import Image, ImageDraw

    h, w = rows[0][0].shape[:2]
    ch, cw, gap, left, top = h * scale, w * scale, 4, 330, 30
    grid = Image.new("RGB", (left + len(col_labels) * (cw + gap), top + len(rows) * (ch + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        # Two lines of at most ~16 characters: a column is 96 px wide at the default scale, and
        # longer labels ran into their neighbours ("noisy_pointwise@0.1 (seed 0)").
        lines = textwrap.wrap(label.replace("@", " @"), 16)[:2]
        draw.multiline_text((left + j * (cw + gap), 2), "\n".join(lines), fill=(0, 0, 0), spacing=1)
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        y = top + i * (ch + gap)
        draw.text((4, y + ch // 2 - 6), label[:60], fill=(0, 0, 0))
        for j, img in enumerate(row):
            grid.paste(Image.fromarray(_tile(img, scale)), (left + j * (cw + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


# --------------------------------------------------------------------------- #
# Markdown
# --------------------------------------------------------------------------- #


def _ci(interval, digits: int = 2) -> str:
    m, lo, hi = interval
    if not np.isfinite(lo):
        return f"{m:+.{digits}f} [n/a: one seed]"
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def decision_section(decision: dict, summary: dict) -> list[str]:
    """The rule's numbers: power, the noise sweep, the mechanism per arm, the conclusion."""
    L = ["## Conclusion", "", f"**{decision['conclusion']}**"
         + (f"; learned proxies: **{decision['learned_verdict']}**" if "learned_verdict" in decision else "")
         + ".", "", "## Testbed power", ""]
    if "verifier_gain" in decision:
        L.append(f"Verifier arm held-out gain: {_ci(decision['verifier_gain'])} points (mean [95% CI]); "
                 f"every seed up: {decision['verifier_all_seeds_up']}. Goal: >= +15 with every seed up.")
    L += ["", "## Noise sweep: held-out verifier gain (points, mean [95% CI] over seeds)", "",
          "| noise | noisy judge as score | noisy judge as win rates | pairwise - pointwise (Welch) |",
          "|---|---|---|---|"]
    for sigma, lv in decision["levels"].items():
        L.append(f"| {sigma} | {_ci(lv['pointwise'])} | {_ci(lv['pairwise'])} | {_ci(lv['difference'])} |")
    if "learned_difference" in decision:
        L.append(f"| learned proxies | {_ci(t_interval([100 * v for v in summary['pointwise']['heldout_overall_delta']['values']]))} "
                 f"| {_ci(t_interval([100 * v for v in summary['pairwise']['heldout_overall_delta']['values']]))} "
                 f"| {_ci(decision['learned_difference'])} |")
    L += ["", "## The mechanism (training reward vs the verifier, on the policy's rollouts; mean over seeds)", "",
          "| arm | adv/verifier correlation first -> last (run mean) | noise share first -> last (run mean) | "
          "amplification first -> last | judge error in the judged held-out change (points) |",
          "|---|---|---|---|---|"]
    for arm, a in summary.items():
        if "mech_corr_first" not in a or arm == "verifier":  # the verifier agrees with itself
            continue

        def fl(k, d=3):
            return (f"{a[f'{k}_first']['mean']:.{d}f} -> {a[f'{k}_last']['mean']:.{d}f}"
                    + (f" ({a[f'{k}_mean']['mean']:.{d}f})" if f"{k}_mean" in a else ""))
        L.append(f"| {arm} | {fl('mech_corr')} | {fl('mech_noise_share')} | "
                 f"{a['mech_amplification_first']['mean']:.1f} -> {a['mech_amplification_last']['mean']:.1f} | "
                 + (_pm(a, 'heldout_judge_error_delta', 100, 2) if 'heldout_judge_error_delta' in a else "n/a")
                 + " |")
    L += ["", "Correlation: pooled Pearson between the training reward's normalised advantages and the "
          "verifier's on the same rollout (verifier arm: 1 by definition, not shown). Noise share: the share of "
          "advantage variance inside sets of images the verifier scores equally (a lower bound on the noise). "
          "Amplification: advantage spread over raw reward spread per group (the paper's HPS example: ~390). "
          "Judge error: how many points of the noisy judge's view of the held-out change (final vs base) are "
          "its own error sigma * z, not verifier gain (positive: the policy learned to please the judge's bias)."]
    return L


def write_markdown(path: Path, result: dict) -> None:
    s, meta = result["summary"], result["meta"]
    dims = [d for d in result["base_eval"]["table"] if d != "overall"]
    L = ["# Toy-world study: pointwise score vs pairwise win rate as the GRPO reward", ""]
    if meta.get("partial"):
        L += [f"**PARTIAL RESULTS**: {meta['partial']}.", ""]
    if len(meta["seeds"]) < MIN_SEEDS:
        L += [f"**REDUCED RUN**: {len(meta['seeds'])} seed(s) x {meta['steps']} steps, not the study's size; "
              "it shows the code path works, its numbers answer nothing.", ""]
    L += [
         f"Reproduce: `{meta['command']}` (after `{result['proxies'].get('command', 'python experiments/toyworld/train_proxies.py')}`).",
         f"Machine: {meta['machine']}. Total wall time {meta['wall_s'] / 60:.1f} min "
         f"({meta['runs_completed']} runs of {meta['steps']} steps); load average (1/5/15 min) "
         f"{meta['loadavg_start']} at the start, {meta.get('loadavg_end')} at the end.",
         "",
         "## Set-up",
         "",
         f"- Base model: `{meta['base']}` (held-out verifier overall "
         f"{100 * result['base_eval']['table']['overall']:.2f}).",
         f"- Budget per run: {meta['steps']} GRPO steps x {meta['prompts_per_step']} prompts x group "
         f"{meta['group_size']}, {meta['sample_steps']} SDE steps, lr {meta['learning_rate']}, clip range "
         f"{meta['clip_range']}; seeds {meta['seeds']}.",
         f"- Proxies (`train_proxies.py`): trained on {result['proxies'].get('data_train_pairs', '?')} "
         f"within-group pairs of base-model samples labelled by the verifier with "
         f"{100 * float(result['proxies'].get('data_label_noise', float('nan'))):.0f}% flipped labels "
         f"(ties: {result['proxies'].get('data_ties', '?')}). Held-out pair accuracy vs the verifier: "
         f"pairwise {result['proxies'].get('pairwise_heldout_accuracy_vs_verifier', float('nan')):.3f}, "
         f"pointwise {result['proxies'].get('pointwise_heldout_accuracy_vs_verifier', float('nan')):.3f}.",
         "- Arms: " + "; ".join(f"`{a}` = {arm_label(a)} (reward spec `{arm_spec(a, meta['oracle'])}`)"
                                 for a in result["runs"]) + ".",
         "",
         "## Decision rule (fixed in the code before the runs)",
         "",
         meta["decision_rule"],
         ""] + decision_section(result["decision"], s) + [
         "",
         "## Headline numbers (mean ± std over seeds)",
         "",
         f"Training-rollout numbers average the first / last {next(iter(s.values()))['window_steps']} steps.",
         "",
         "| arm | verifier (train rollouts) first -> last | pointwise proxy (train rollouts) delta | "
         "verifier on fixed training prompts, delta vs base (points) | held-out verifier overall | "
         "held-out delta vs base (points) | pairwise proxy P(final > base), held-out | verifier win rate vs base, "
         "held-out | diversity first -> last |",
         "|---|---|---|---|---|---|---|---|---|"]
    for arm, a in s.items():
        L.append(
            f"| {arm} | {a['train_verifier_first']['mean']:.3f} -> {a['train_verifier_last']['mean']:.3f} "
            f"| {_pm(a, 'train_pointwise_proxy_delta')} | {_pm(a, 'trainprompts_overall_delta', 100, 2) if 'trainprompts_overall_delta' in a else 'n/a'} "
            f"| {_pm(a, 'heldout_overall_final', 100, 2)} "
            f"| {_pm(a, 'heldout_overall_delta', 100, 2)} | {_pm(a, 'heldout_pairwise_proxy_pref_over_base')} "
            f"| {_pm(a, 'heldout_verifier_winrate_over_base')} "
            f"| {a['train_diversity_first']['mean']:.4f} -> {a['train_diversity_last']['mean']:.4f} |")
    L += ["", "## The illusory advantage (training reward, first -> last window)", "",
          "| arm | training reward | within-group std | advantage spread | fidelity of pointwise proxy | "
          "fidelity of pairwise proxy |", "|---|---|---|---|---|---|"]
    for arm, a in s.items():
        L.append(
            f"| {arm} | `{training_source(arm, meta['oracle'])}` | {a['train_reward_group_std_first']['mean']:.4f} -> "
            f"{a['train_reward_group_std_last']['mean']:.4f} | {a['train_adv_spread_first']['mean']:.2f} -> "
            f"{a['train_adv_spread_last']['mean']:.2f} | {a['fidelity_pointwise_model_first']['mean']:.3f} -> "
            f"{a['fidelity_pointwise_model_last']['mean']:.3f} | {a['fidelity_pairwise_model_first']['mean']:.3f} -> "
            f"{a['fidelity_pairwise_model_last']['mean']:.3f} |")
    L += ["", "Fidelity: among within-group pairs the verifier orders strictly, the fraction the proxy "
          "orders the same way (0.5 = chance), on the policy's own rollouts.", "",
          "## Held-out verifier per dimension (x100, final checkpoints, mean ± std over seeds)", "",
          "| model | " + " | ".join(dims) + " | overall |", "|---|" + "---|" * (len(dims) + 1),
          "| base | " + " | ".join(f"{100 * result['base_eval']['table'][d]:.2f}" for d in dims)
          + f" | {100 * result['base_eval']['table']['overall']:.2f} |"]
    for arm, a in s.items():
        L.append(f"| {arm} | " + " | ".join(_pm(a, f"heldout_{d}_final", 100, 1) for d in dims)
                 + f" | {_pm(a, 'heldout_overall_final', 100, 2)} |")
    if "train_prompts_table" in result["base_eval"]:
        dims = [d for d in result["base_eval"]["train_prompts_table"] if d != "overall"]
        L += ["", "## Verifier on a fixed sample of training prompts per dimension (x100, final, mean ± std)", "",
              "| model | " + " | ".join(dims) + " | overall |", "|---|" + "---|" * (len(dims) + 1),
              "| base | " + " | ".join(f"{100 * result['base_eval']['train_prompts_table'][d]:.2f}" for d in dims)
              + f" | {100 * result['base_eval']['train_prompts_table']['overall']:.2f} |"]
        for arm, a in s.items():
            if "trainprompts_overall_final" in a:
                L.append(f"| {arm} | " + " | ".join(_pm(a, f"trainprompts_{d}_final", 100, 1) for d in dims)
                         + f" | {_pm(a, 'trainprompts_overall_final', 100, 2)} |")
    L += ["", "## What the numbers show (the old per-arm hacking flag)", ""] + findings(s)
    if result.get("discussion"):
        L += ["", result["discussion"]]
    L += ["", "## Files", ""]
    for f in result["files"]:
        L.append(f"- `{f}`")
    L += ["", f"Per-step curves of every run, all evaluation tables and the configs: `{result['files'][0]}`."]
    path.write_text("\n".join(L) + "\n")


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def finalize(result: dict, args, grids: dict, base_images: np.ndarray, cfg0, arms: list[str],
             seeds: list[int], t_start: float, partial: str | None) -> dict:
    """Writes <tag>.json, <tag>.md, the plots and the image grids from what has run so far."""
    from prefgrpo_jax.evaluate import heldout_set

    meta = result["meta"]
    meta["partial"] = partial
    results_dir = Path(args.results)
    arms = [a for a in arms if a in result["runs"]]
    seeds = sorted({int(s) for a in arms for s in result["runs"][a]})
    meta["wall_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["runs_completed"] = sum(len(v) for v in result["runs"].values())
    meta["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    base_eval = result["base_eval"]
    result["summary"] = summarise(result["runs"], base_eval, args, args.oracle)
    result["decision"] = decide(result["summary"], meta["noise"])

    files = [results_dir / f"{args.tag}.json", results_dir / f"{args.tag}.md"]
    if args.plots:
        headline_png = results_dir / f"{args.tag}_headline.png"
        plot_headline(result, args, headline_png)
        files.append(headline_png)
        curves_png = results_dir / f"{args.tag}_curves.png"
        heldout_png = results_dir / f"{args.tag}_heldout.png"
        plot_curves(result["runs"], args, args.oracle, curves_png)
        plot_heldout(result["runs"], base_eval, heldout_png)
        files += [curves_png, heldout_png]
    # Held-out before/after grid (same prompts and noise): base | each arm's final, first seed.
    specs_idx = np.arange(0, len(base_images), max(1, len(base_images) // 10))[:10]
    texts = [s.text for s in heldout_set(cfg0)]
    s0 = seeds[0]
    rows = [[base_images[i]] + [grids[a][s0]["eval"][args.steps][i] for a in arms] for i in specs_idx]
    grid_png = results_dir / f"{args.tag}_grid_heldout.png"
    image_grid(rows, [texts[i] for i in specs_idx], ["base"] + [f"{a} (seed {s0})" for a in arms], grid_png)
    files.append(grid_png)
    # Training groups at the first and last step (SDE rollouts): diversity within a group.
    for arm in arms:
        g = grids[arm][s0]["groups"]
        rows, labels = [], []
        for step in sorted(g):
            prompts, imgs = g[step]
            for k in range(len(imgs)):
                rows.append(list(imgs[k]))
                labels.append(f"step {step}: {prompts[k]}")
        path = results_dir / f"{args.tag}_groups_{file_stem(arm)}.png"
        image_grid(rows, labels, [f"image {j}" for j in range(len(rows[0]))], path, scale=2)
        files.append(path)
    result["files"] = [str(f.relative_to(REPO)) if f.is_relative_to(REPO) else str(f) for f in files]
    files[0].write_text(json.dumps(result, indent=1, default=float) + "\n")
    write_markdown(files[1], result)
    print(f"[study] wrote {', '.join(result['files'])}; {meta['wall_s'] / 60:.1f} min so far", flush=True)
    return result


def render(args) -> dict:
    """``--render_only``: the summary, decision, markdown and plots again from ``<tag>.json``
    (the image grids need the runs' images and are left as they are)."""
    results_dir = Path(args.results)
    result = json.loads((results_dir / f"{args.tag}.json").read_text())
    args.steps = int(result["meta"]["steps"])  # the summary's windows follow the runs' length
    result["summary"] = summarise(result["runs"], result["base_eval"], args, result["meta"]["oracle"])
    result["decision"] = decide(result["summary"], result["meta"]["noise"])
    if args.plots:
        plot_headline(result, args, results_dir / f"{args.tag}_headline.png")
        plot_curves(result["runs"], args, result["meta"]["oracle"], results_dir / f"{args.tag}_curves.png")
        plot_heldout(result["runs"], result["base_eval"], results_dir / f"{args.tag}_heldout.png")
    (results_dir / f"{args.tag}.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    write_markdown(results_dir / f"{args.tag}.md", result)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render_only:
        return render(args)
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(args.workdir) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    import shutil

    import prefgrpo_jax.toyworld.reward  # noqa: F401  (registers the verifier reward sources)
    from prefgrpo_jax.toyworld.noisy_judge import JudgementError  # (and registers the noisy judges)
    from prefgrpo_jax import evaluate
    from prefgrpo_jax.rewards.pairwise import read_reward_config
    from prefgrpo_jax.state import load_pipeline
    from prefgrpo_jax.train_logging import read_metrics

    t_start = time.perf_counter()
    noise = [float(x) for x in args.noise.split(",") if x]
    arms = expand_arms([a for a in args.arms.split(",") if a], noise)
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    eval_every = args.eval_every or args.steps
    eval_at = set(range(eval_every, args.steps + 1, eval_every)) | {args.steps}
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[study {time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    proxies = Proxies(args.proxies)
    proxy_meta = {}
    for kind in ("pairwise", "pointwise"):
        extra = read_reward_config(Path(args.proxies) / f"reward_{kind}")["extra"]
        for k, v in extra.items():
            if k.startswith("data_") or k in ("command", "base_model"):
                proxy_meta[k] = v
            else:
                proxy_meta[f"{kind}_{k}"] = v

    # Base model, held-out.
    cfg0 = arm_config(args, arms[0], seeds[0])
    t0 = time.perf_counter()
    base_pipe = load_pipeline(cfg0)
    train_prompts = train_eval_prompts(cfg0, args.eval_per_dim)
    base_eval, base_images = heldout_eval(base_pipe, cfg0, proxies, None, train_prompts)
    base_eval["pairwise_proxy_pref_over_base"] = 0.5
    base_eval["verifier_winrate_over_base"] = 0.5
    base_eval["wall_s"] = time.perf_counter() - t0
    del base_pipe
    log(f"base model held-out: {base_eval['table']} ({base_eval['wall_s']:.0f}s)")
    official_base = None
    if args.official_eval:
        official_base = evaluate.evaluate(cfg0, work / "base_eval")["scores"]

    meta = {
        "command": " ".join(["python", "experiments/toyworld/study.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                   f"jax {jax.__version__} on {jax.devices()[0].platform}",
        "base": str(args.base), "proxies": str(args.proxies), "arms": arms, "seeds": seeds,
        "steps": args.steps, "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
        "sample_steps": args.sample_steps, "learning_rate": float(cfg0.optim.learning_rate),
        "clip_range": float(cfg0.train.clip_range), "oracle": args.oracle, "noise": noise,
        "updates_per_rollout": int(cfg0.train.updates_per_rollout), "rationorm": bool(cfg0.train.rationorm),
        "decision_rule": DECISION_RULE, "min_seeds": MIN_SEEDS, "eval_at": sorted(eval_at),
        "eval_per_dim": args.eval_per_dim, "eval_steps": args.eval_steps,
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        # Other jobs on the machine stretch the wall time: say how busy it was.
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    result: dict[str, Any] = {"meta": meta, "proxies": proxy_meta, "base_eval": base_eval,
                              "official_base_eval": official_base, "configs": {}, "runs": {}}
    grids: dict[str, dict] = {}
    total_runs = len(arms) * len(seeds)
    done_runs = 0
    # Seed-major order: a partial study still has every arm at the first seeds.
    for seed in seeds:
        for arm in arms:
            config = arm_config(args, arm, seed)
            wd = work / f"{file_stem(arm)}_seed{seed}"
            if wd.exists():
                shutil.rmtree(wd)
            t0 = time.perf_counter()
            _, sigma = parse_arm(arm)
            judge_error = None if sigma is None else JudgementError(seed, int(config.train.height))
            trainer = make_study_trainer(eval_at, proxies, base_images, train_prompts,
                                         judge_error, sigma or 0.0)(config, wd)
            trainer.run()
            curve = read_metrics(wd)
            run = {"curve": curve, "evals": {str(k): v for k, v in sorted(trainer.evals.items())},
                   "wall_s": time.perf_counter() - t0}
            if args.official_eval:
                off = evaluate.evaluate(config, wd)
                run["official_final_eval"] = off["scores"]
                final_table = trainer.evals[args.steps]["table"]
                run["official_matches_inloop"] = bool(all(
                    abs(off["scores"][k] - final_table[k]) < 1e-9 for k in final_table))
            run["wall_s_with_eval"] = time.perf_counter() - t0
            result["runs"].setdefault(arm, {})[str(seed)] = run
            result["configs"][arm] = config.to_dict()
            grids.setdefault(arm, {})[seed] = {"eval": trainer.eval_images, "groups": trainer.group_images}
            done_runs += 1
            last = curve[-1]
            log(f"run {done_runs}/{total_runs} {arm} seed {seed}: {run['wall_s']:.0f}s; verifier (train) "
                f"{curve[0]['reward_mean']:.3f} -> {last['reward_mean']:.3f}; held-out overall "
                f"{trainer.evals[args.steps]['table']['overall']:.3f}"
                + (f"; official eval matches: {run['official_matches_inloop']}" if args.official_eval else ""))
            del trainer
            if not args.keep_workdirs:
                shutil.rmtree(wd, ignore_errors=True)
            if done_runs < total_runs:  # results so far, labelled partial, survive an interruption
                finalize(result, args, grids, base_images, cfg0, arms, seeds, t_start,
                         partial=f"{done_runs} of {total_runs} runs completed; the study was still running")

    return finalize(result, args, grids, base_images, cfg0, arms, seeds, t_start, partial=None)


if __name__ == "__main__":
    main()
