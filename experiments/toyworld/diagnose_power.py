"""Why does GRPO on the verifier gain little? A few training steps, measured.

    nice -n 19 python experiments/toyworld/diagnose_power.py --steps=6 -- --lr=1e-4
    nice -n 19 python experiments/toyworld/diagnose_power.py --steps=6 -- --eta=1.0 --group_size=16

Runs the verifier arm of ``study.py`` (the flags after ``--`` are study.py's) for
``--steps`` updates and prints, per step and averaged: the step's wall time, the
verifier's mean score per testpoint kind on the rollout, the share of groups whose
verifier scores are all equal (they give every image a zero advantage), the share
of within-group pairs the verifier orders strictly, the within-group std, the
policy ratio's range and the clip fraction (is the update size near the clip
range or far below it?). The rollouts of step 1 are the base model's, so they
also show how much the SDE's exploration varies the verified attributes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments.toyworld import study  # noqa: E402


def group_stats(scores: np.ndarray) -> dict[str, float]:
    """Verifier scores ``[N, G]`` -> share of flat groups, share of strictly ordered pairs, mean within-group std."""
    s = np.asarray(scores, np.float64)
    g = s.shape[1]
    diff = s[:, :, None] != s[:, None, :]
    iu = np.triu_indices(g, 1)
    return {"flat_group_frac": float(np.mean(np.ptp(s, axis=1) == 0)),
            "strict_pair_frac": float(diff[:, iu[0], iu[1]].mean()),
            "group_std": float(s.std(axis=1).mean())}


def kind_means(prompts: list[str], images: np.ndarray) -> dict[str, float]:
    """Mean pass rate per testpoint kind over a rollout (``images [N, G, H, W, 3]``)."""
    from prefgrpo_jax.toyworld.verify import verify

    kinds: dict[str, list[float]] = {}
    for p, group in zip(prompts, images):
        for img in group:
            for k, v in verify(img, p).items():
                if k != "score":
                    kinds.setdefault(k, []).append(v)
    return {f"kind/{k}": float(np.mean(v)) for k, v in sorted(kinds.items())}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, study_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--workdir", default="/tmp/toyworld_diagnose")
    p.add_argument("--out", default="", help="optional json path for the per-step rows")
    args = p.parse_args(own)
    import shutil

    import jax

    import prefgrpo_jax.toyworld.reward  # noqa: F401  (registers the verifier reward sources)

    sargs = study.parse_args(["--arms=verifier", f"--steps={args.steps}", *study_flags])
    jax.config.update("jax_compilation_cache_dir", str(Path(sargs.workdir) / "jax_cache"))
    config = study.arm_config(sargs, "verifier", int(sargs.seeds.split(",")[0]))
    wd = Path(args.workdir)
    shutil.rmtree(wd, ignore_errors=True)
    proxies = study.Proxies(sargs.proxies)
    trainer = study.make_study_trainer(set(), proxies, None)(config, wd)
    rows = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        with trainer.activations():
            m = trainer.step(step)
        prompts, images = trainer._last_images
        row = {"step": step + 1, "wall_s": time.perf_counter() - t0, "reward_mean": m["reward_mean"],
               **group_stats(trainer.captured["verifier"]), **kind_means(prompts, images),
               "ratio_min": m["ratio_min"], "ratio_max": m["ratio_max"], "clip_fraction": m["clip_fraction"],
               "approx_kl": m["approx_kl"], "grad_norm": m["grad_norm"], "diversity": m["diversity/pixel_rms"]}
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    later = rows[1:] or rows  # step 1 holds the compilation
    keys = sorted({k for r in rows for k in r} - {"step"})
    mean = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
    mean["wall_s"] = float(np.mean([r["wall_s"] for r in later]))
    print("mean", json.dumps({k: round(v, 4) for k, v in mean.items()}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"study_flags": study_flags, "rows": rows, "mean": mean}, indent=1))
    if trainer.lock is not None:
        trainer.lock.release()
    shutil.rmtree(wd, ignore_errors=True)
    return {"rows": rows, "mean": mean}


if __name__ == "__main__":
    main()
