"""``--mode=eval``: per-dimension scores of a checkpoint on a held-out prompt set.

Like UniGenBench, every prompt has binary testpoints and the overall score is
the unweighted mean over dimensions. Two judges (``eval.judge``):

* ``toy_verifier``: the toy world's pixel verifier on its fixed held-out
  prompts; it reads the testpoints from the prompt itself. A prompt's score is
  the fraction it passes, a dimension's score the mean over its prompts.
* ``vlm_judge``: a VLM served behind an OpenAI-compatible API (vLLM, or a
  proxy to a hosted model) answers yes/no per testpoint
  (:meth:`VLMJudge.testpoint_scores`), on the prompts of ``eval.prompts``, a
  JSONL file with one prompt per line::

    {"prompt": "...", "dimension": "Attribute",
     "testpoints": ["Is the cat black?", {"text": "...", "dimension": "Action"}]}

  A testpoint string takes the prompt's ``dimension``. A dimension's score is
  the fraction of its judged testpoints that pass; testpoints the judge gave
  no verdict for are left out and counted in the report (``unjudged``).
* ``unigenbench``: the benchmark as its authors run it, from a clone of
  UniGenBench (``eval.unigenbench_dir``, ``eval.unigenbench_set``): their
  prompts, judge template and scoring (:mod:`prefgrpo_jax.unigenbench`) and
  their generation protocol (``eval.unigenbench.*``: 4 images per prompt from
  noise seeds 3407 + j, 1024 x 1024, 30 steps, guidance 3.5). Images are
  written as ``{index}_{j}.png`` and the judge's replies as the official
  result CSV, which UniGenBench's ``calculate_score.py`` re-scores.

``eval.every`` > 0 also scores a fixed subset during training
(:class:`PeriodicEval`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from prefgrpo_jax import config as config_lib, workdir_lock
from prefgrpo_jax.state import load_trained_pipeline
from prefgrpo_jax.train_logging import save_image_grid

log = logging.getLogger(__name__)
# Keyword arguments of VLMJudge that eval.vlm_judge may set.
VLM_JUDGE_OPTIONS = ("base_url", "model", "api_key_env", "max_concurrency", "timeout_s", "retries",
                     "max_tokens")


def load_testpoint_prompts(path: str | Path) -> list[dict[str, Any]]:
    """``eval.prompts`` JSONL -> ``[{"prompt", "testpoints": [(dimension, question)]}]``.

    Raises:
      FileNotFoundError / ValueError naming the file and line of the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval.prompts={str(path)!r} does not exist (a JSONL file of "
                                "{\"prompt\", \"dimension\", \"testpoints\"} objects)")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{where}: needs a non-empty \"prompt\" string")
        raw = row.get("testpoints")
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{where}: needs a non-empty \"testpoints\" list")
        testpoints = []
        for tp in raw:
            if isinstance(tp, dict):
                text, dim = tp.get("text"), tp.get("dimension", row.get("dimension"))
            else:
                text, dim = tp, row.get("dimension")
            if not isinstance(text, str) or not text.strip() or not isinstance(dim, str) or not dim.strip():
                raise ValueError(f"{where}: every testpoint needs a question and a dimension (its own "
                                 f"\"dimension\" or the prompt's), got {tp!r}")
            testpoints.append((dim.strip(), text.strip()))
        items.append({"prompt": row["prompt"], "testpoints": testpoints})
    if not items:
        raise ValueError(f"eval.prompts={str(path)!r} holds no prompts")
    return items


def testpoint_table(verdicts: list[tuple[str, float]]) -> tuple[dict[str, float], dict[str, int]]:
    """``(dimension, 1.0 | 0.0 | NaN)`` per testpoint -> (scores, unjudged counts).

    Dimensions in first-seen order; a dimension with no judged testpoint scores NaN.
    """
    passed: dict[str, list[float]] = {}
    unjudged: dict[str, int] = {}
    for dim, v in verdicts:
        passed.setdefault(dim, [])
        unjudged.setdefault(dim, 0)
        if np.isnan(v):
            unjudged[dim] += 1
        else:
            passed[dim].append(v)
    table = {d: float(np.mean(v)) if v else float("nan") for d, v in passed.items()}
    table["overall"] = float(np.nanmean(list(table.values()))) if table else float("nan")
    return table, unjudged


def generate(pipe, prompts: list[str], config: config_lib.RunConfig, key: jax.Array) -> np.ndarray:
    """Images ``[len(prompts), H, W, 3]`` with the deterministic sampler, in fixed-size batches."""
    e, t = config.eval, config.train
    batch = int(e.batch_size)
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))  # one compiled shape
        images = pipe(
            padded, height=t.height, width=t.width, num_inference_steps=int(e.num_steps),
            guidance_scale=t.guidance_scale, key=jax.random.fold_in(key, start),
        )
        out.append(np.asarray(images)[: len(chunk)])
    return np.concatenate(out)


def _finite_or_null(obj: Any) -> Any:
    """``obj`` with every NaN/Inf float replaced by None (JSON null)."""
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def score_table_markdown(table: dict[str, float], title: str) -> str:
    dims = [d for d in table if d != "overall"]
    header = "| " + " | ".join(["model"] + dims + ["overall"]) + " |"
    sep = "|" + "---|" * (len(dims) + 2)
    row = "| " + " | ".join([title] + [f"{100 * table[d]:.2f}" for d in dims] + [f"{100 * table['overall']:.2f}"]) + " |"
    return "\n".join([header, sep, row])


def heldout_set(config: config_lib.RunConfig) -> list[Any]:
    from prefgrpo_jax.toyworld.scenes import heldout_prompts

    return heldout_prompts(n_per_dim=int(config.eval.prompts_per_dimension))


def _toy_verifier_task(config: config_lib.RunConfig):
    """(prompts, scorer): the toy world's held-out set judged by its verifier."""
    from prefgrpo_jax.toyworld.verify import score_table, verify

    specs = heldout_set(config)

    def score(images: np.ndarray, index: list[int]) -> dict[str, Any]:
        picked = [specs[i] for i in index]
        return {"scores": score_table([verify(img, sp) for img, sp in zip(images, picked)], picked)}
    return [s.text for s in specs], score


def vlm_judge_options(config: config_lib.RunConfig) -> dict[str, Any]:
    """``VLMJudge`` keywords from ``eval.vlm_judge``."""
    options = {k: config.eval.vlm_judge[k] for k in VLM_JUDGE_OPTIONS if k in config.eval.vlm_judge}
    options["api_key_env"] = options.get("api_key_env") or None
    return options


def _vlm_judge_task(config: config_lib.RunConfig):
    """(prompts, scorer): ``eval.prompts`` judged testpoint by testpoint by a VLM."""
    from prefgrpo_jax.rewards.judge import VLMJudge

    items = load_testpoint_prompts(config.eval.prompts)
    options = vlm_judge_options(config)

    def score(images: np.ndarray, index: list[int]) -> dict[str, Any]:
        picked = [items[i] for i in index]
        with VLMJudge(**options) as judge:
            verdicts = judge.testpoint_scores([it["prompt"] for it in picked], images,
                                              [[q for _, q in it["testpoints"]] for it in picked])
            stats = judge.stats.as_dict()
        flat = [(dim, float(v)) for it, vs in zip(picked, verdicts)
                for (dim, _), v in zip(it["testpoints"], vs)]
        table, unjudged = testpoint_table(flat)
        return {"scores": table, "unjudged": unjudged, "judge_stats": stats,
                "judge": {k: v for k, v in options.items() if k != "api_key_env"}}
    return [it["prompt"] for it in items], score


def _unigenbench_task(config: config_lib.RunConfig):
    """(prompts, scorer): UniGenBench prompts, the official judge request and scoring.

    The scorer's table holds the primary-dimension accuracies and ``overall``.
    """
    from prefgrpo_jax import unigenbench
    from prefgrpo_jax.rewards.judge import VLMJudge

    e = config.eval
    protocol, items, _ = unigenbench.load_set(e.unigenbench_dir, e.unigenbench_set, int(e.unigenbench.limit))

    def score(images: np.ndarray, index: list[int]) -> dict[str, Any]:
        jobs = [(items[i], img, f"{items[i].index}") for i, img in zip(index, images)]
        with VLMJudge(**vlm_judge_options(config)) as judge:
            results = unigenbench.judge_images(judge, protocol, jobs, int(e.unigenbench.max_retries))
        summary = unigenbench.score_results(results)
        return {"scores": unigenbench.score_table(summary), "images_skipped": summary["images_skipped"]}
    return [it.prompt for it in items], score


TASKS: dict[str, Callable[[config_lib.RunConfig], tuple[list[str], Callable]]] = {
    "toy_verifier": _toy_verifier_task,
    "vlm_judge": _vlm_judge_task,
    "unigenbench": _unigenbench_task,
}


class PeriodicEval:
    """Eval during training: ``eval.every_prompts`` prompts of the eval judge's set.

    The prompts are evenly spaced over the set (so every dimension is present)
    and fixed for the run, as are the noise (``eval.seed``), the size (the
    training size) and the steps (``eval.num_steps``): successive evals differ
    only by the weights. One image per prompt.
    """

    def __init__(self, config: config_lib.RunConfig):
        self.config = config
        prompts, self.score = TASKS[config.eval.judge](config)
        count = min(int(config.eval.every_prompts), len(prompts))
        self.index = [int(i) for i in np.linspace(0, len(prompts) - 1, count).round()]
        self.prompts = [prompts[i] for i in self.index]

    def __call__(self, pipe) -> dict[str, float]:
        """``eval/<dimension>`` and ``eval/overall`` of ``pipe`` (its transformer = the trained weights)."""
        t0 = time.perf_counter()
        images = generate(pipe, self.prompts, self.config, jax.random.key(int(self.config.eval.seed)))
        out = self.score(images, self.index)
        metrics = {f"eval/{dim}": float(v) for dim, v in out["scores"].items()}
        if "images_skipped" in out:  # UniGenBench: images whose replies never parsed
            metrics["eval_images_skipped"] = float(out["images_skipped"])
        metrics["eval_time_s"] = time.perf_counter() - t0
        return metrics


def generate_seeded(pipe, prompts: list[str], *, seed: int, height: int, width: int, num_steps: int,
                    guidance_scale: float | None, batch: int):
    """Yields ``(start, images [n, H, W, 3])`` batches of ``prompts`` in order.

    Every prompt starts from the same noise, drawn from ``key(seed)``, as in
    UniGenBench's scripts where image j of every prompt uses generator seed
    3407 + j (the seeds match; JAX's noise is not torch's).
    """
    h, w = pipe.latent_hw(height, width)
    shape = ((h // 2) * (w // 2), pipe.transformer.cfg.in_channels)
    noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    latents = jnp.broadcast_to(noise, (batch, *shape))
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))  # one compiled shape
        images = pipe(padded, height=height, width=width, num_inference_steps=num_steps,
                      guidance_scale=guidance_scale, latents=latents)
        yield start, np.asarray(images)[: len(chunk)]


def unigenbench_setup(config: config_lib.RunConfig) -> tuple[config_lib.RunConfig, tuple]:
    """(config to load the pipeline with, ``unigenbench.load_set`` output), before anything loads.

    Fails fast: the clone is read and the eval judge answers one real request
    (``judge_check``) before hours of sampling.
    """
    from prefgrpo_jax import unigenbench
    from prefgrpo_jax.judge_check import check_eval_judge
    from prefgrpo_jax.rewards.judge import JudgeUnavailableError

    e = config.eval
    task = unigenbench.load_set(e.unigenbench_dir, e.unigenbench_set, int(e.unigenbench.limit))
    check = check_eval_judge(config)
    if not check.ok:
        raise JudgeUnavailableError("the UniGenBench judge is not ready:\n" + check.report())
    # The text encoders' token budget is fixed when the pipeline loads: load with the protocol's.
    train = config.train.replace(max_sequence_length=int(e.unigenbench.max_sequence_length))
    return config.replace(train=train), task


def evaluate_unigenbench(config: config_lib.RunConfig, task: tuple, pipe, step: int | None,
                         workdir: str | Path, t0: float) -> dict[str, Any]:
    """UniGenBench with the official protocol; writes images, result CSV, JSON and markdown.

    ``task`` is ``unigenbench.load_set``'s (protocol, items, data issues).
    Layout under ``workdir/eval/unigenbench_{set}/``: ``{name}/{index}_{j}.png``
    (``name`` = ``step_XXXXXX`` or ``base``), ``results/{name}_{set}.csv`` (the
    official result CSV) and ``results/{name}_{set}.{json,md}`` (the scores,
    image counts, data issues and judge counters).
    """
    from prefgrpo_jax import unigenbench
    from prefgrpo_jax.rewards.judge import VLMJudge, image_to_uint8

    e, u = config.eval, config.eval.unigenbench
    protocol, items, issues = task
    name = f"step_{step:06d}" if step is not None else "base"
    root = Path(workdir) / "eval" / f"unigenbench_{e.unigenbench_set}"
    image_dir = root / name
    image_dir.mkdir(parents=True, exist_ok=True)
    prompts = [it.prompt for it in items]

    def jobs():
        for j in range(int(u.images_per_prompt)):
            for start, images in generate_seeded(
                    pipe, prompts, seed=int(u.seed) + j, height=int(u.height), width=int(u.width),
                    num_steps=int(u.num_steps), guidance_scale=u.guidance_scale, batch=int(e.batch_size)):
                for item, image in zip(items[start:], images):
                    path = image_dir / f"{item.index}_{j}.png"
                    Image.fromarray(image_to_uint8(image), mode="RGB").save(path)
                    yield item, path, str(path)

    with VLMJudge(**vlm_judge_options(config)) as judge:
        results = unigenbench.judge_images(judge, protocol, jobs(), int(u.max_retries))
        stats = judge.stats.as_dict()
    summary = unigenbench.score_results(results)
    csv_path = unigenbench.write_results_csv(root / "results" / f"{name}_{e.unigenbench_set}.csv", results)
    report = {
        "checkpoint_step": step,
        "model_path": str(config.model.path),
        "judge": "unigenbench",
        "unigenbench_dir": str(e.unigenbench_dir),
        "unigenbench_set": e.unigenbench_set,
        "protocol": u.to_dict(),
        "prompts": len(items),
        "images": len(results),
        "scores": unigenbench.score_table(summary),
        **summary,
        "data_issues": issues,
        "judge_stats": stats,
        "judge_model": str(e.vlm_judge["model"]),
        "results_csv": str(csv_path),
        "wall_s": time.perf_counter() - t0,
    }
    csv_path.with_suffix(".json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    markdown = unigenbench.summary_markdown(summary, name)
    csv_path.with_suffix(".md").write_text(markdown + "\n")
    print(markdown, flush=True)
    print(f"({len(results)} images in {image_dir}, {summary['images_skipped']} skipped, "
          f"{len(issues)} data issue(s), {report['wall_s']:.1f} s; results in {csv_path.parent})", flush=True)
    return report


def evaluate(config: ml_collections.ConfigDict | config_lib.RunConfig, workdir: str | Path) -> dict[str, Any]:
    """Scores the latest checkpoint of ``workdir`` (or the base weights) and writes reports."""
    config = config_lib.build(config, mode="eval")
    workdir_lock.prepare_workdir(workdir)  # a read-only workdir fails now, not after judging
    t0 = time.perf_counter()
    official = config.eval.judge == "unigenbench"
    if official:
        config, task = unigenbench_setup(config)
    else:
        prompts, score = TASKS[config.eval.judge](config)
    pipe, step = load_trained_pipeline(config, workdir)
    if official:
        return evaluate_unigenbench(config, task, pipe, step, workdir, t0)
    index = list(range(len(prompts))) * int(config.eval.images_per_prompt)
    images = generate(pipe, [prompts[i] for i in index], config, jax.random.key(int(config.eval.seed)))
    name = f"step_{step:06d}" if step is not None else "base"
    report = {
        "checkpoint_step": step,
        "model_path": str(config.model.path),
        "judge": config.eval.judge,
        "prompts": len(prompts),
        "images": len(index),
        "num_steps": int(config.eval.num_steps),
        **score(images, index),
        "wall_s": time.perf_counter() - t0,
    }
    out_dir = Path(workdir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    # NaN (a dimension with no judged testpoint) is not JSON: written as null.
    (out_dir / f"{name}.json").write_text(json.dumps(_finite_or_null(report), indent=2, allow_nan=False) + "\n")
    markdown = score_table_markdown(report["scores"], name)
    (out_dir / f"{name}.md").write_text(markdown + "\n")
    first = np.arange(0, len(prompts), max(1, len(prompts) // 8))[:8]
    save_image_grid(out_dir / f"{name}.png", images[first][:, None], [prompts[i] for i in first])
    print(markdown, flush=True)
    unjudged = sum(report.get("unjudged", {}).values())
    print(f"({len(index)} images, {report['wall_s']:.1f} s"
          + (f", {unjudged} testpoints without a verdict" if unjudged else "")
          + f"; report in {out_dir})", flush=True)
    return report
