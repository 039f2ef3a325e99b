"""Testbed power: which training settings raise GRPO-on-the-verifier's held-out gain?

    nice -n 19 python experiments/toyworld/power_sweep.py            # every setting, seed 0
    nice -n 19 python experiments/toyworld/power_sweep.py --settings=base,lr3e-4 --seeds=0,1

The toy-world study can only tell the arms apart if GRPO on the ground truth
itself (the verifier arm) gains clearly more than the arms differ. Each setting
here is a set of ``study.py`` flags on top of a common budget; every run trains
the verifier arm alone and records its held-out verifier gain over the base
model (points, x100). Results: ``<results>/<tag>.{json,md}``, rewritten after
every run so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments.toyworld import study  # noqa: E402

# The first testbed (study.py's defaults before this sweep): configs/tiny.py's objective
# (2 updates per rollout, clip 0.05), lr 1e-4, 8 prompts x 8 images, 5 of 9 SDE steps trained,
# the prompt file's own mix. Every setting's flags are given on top of it.
FIRST_TESTBED = ["--prompt_mix=file", "--prompts_per_step=8", "--group_size=8", "--timestep_fraction=0.6",
                 "--timestep_chunk=5", "--updates_per_rollout=2", "--sde_window=0", "--lr=1e-4"]
# Higher signal per update: noise in one window step only (all of a group's reward variance
# comes from the trained step; the group shares its initial noise), one on-policy update, and
# 4x the images per step at about 2x the step's cost; every dimension equally often.
W1_B256 = ["--prompt_mix=balanced", "--sde_window=1", "--sde_window_range=0,3", "--timestep_fraction=1.0",
           "--timestep_chunk=1", "--updates_per_rollout=1", "--prompts_per_step=16", "--group_size=16"]

# name -> study.py flags on top of FIRST_TESTBED and the common budget.
SETTINGS: dict[str, list[str]] = {
    "base": [],
    "lr3e-4": ["--lr=3e-4"],
    "lr3e-4_clip0.2": ["--lr=3e-4", "--clip_range=0.2"],
    "upr4": ["--updates_per_rollout=4"],
    "group16": ["--group_size=16", "--prompts_per_step=4"],
    "steps256": ["--steps=256"],
    "lr3e-4_steps256": ["--lr=3e-4", "--steps=256"],
    # Every dimension equally often in training (the prompt file is 79% position prompts).
    "balanced": ["--prompt_mix=balanced"],
    "balanced_lr2e-4_wu32": ["--prompt_mix=balanced", "--lr=2e-4", "--warmup_steps=32"],
    "w1_b256": W1_B256,
    "w1_b256_lr2e-4": [*W1_B256, "--lr=2e-4"],
    "w1_b256_lr4e-4": [*W1_B256, "--lr=4e-4", "--warmup_steps=8"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {sorted(SETTINGS)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=128, help="common budget (a setting may override it)")
    p.add_argument("--common", default="", help="extra study.py flags for every run, space separated")
    p.add_argument("--results", default=str(study.RESULTS))
    p.add_argument("--tag", default="toyworld_power")
    p.add_argument("--workdir", default="/tmp/toyworld_power")
    p.add_argument("--append", type=int, default=0,
                   help="1: add these runs to an existing <tag>.json (a sweep continued in parts)")
    p.add_argument("--merge", default="",
                   help="comma list of other sweeps' json files (parts run in parallel) to add to "
                        "<tag>.json, then rewrite it; no runs")
    return p.parse_args(argv)


NOTES = "## Diagnosis and notes (by hand)"


def write(result: dict, results: Path, tag: str) -> None:
    """``<tag>.json`` and ``<tag>.md``; an existing md's hand-written part (from :data:`NOTES`
    on) is kept below the regenerated table."""
    md = results / f"{tag}.md"
    notes = md.read_text().partition(NOTES) if md.exists() else ("", "", "")
    (results / f"{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Toy-world testbed power: GRPO on the verifier, held-out gain per setting", "",
             f"Reproduce: `{result['command']}`. Machine: {result['machine']} (shared with other jobs: "
             "wall times are noisy). Each setting's flags are given on top of the first testbed's "
             f"`{' '.join(FIRST_TESTBED)}` and the common budget.", "",
             "| setting | study.py flags | common budget | base held-out | seeds | held-out gain (points) "
             "per seed | mean | train-rollout verifier first -> last | wall s per run | load average "
             "(1 min) at the end |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["settings"].items():
        gains = [100 * g for g in r["gains"]]
        budget = " ".join(r.get("budget", [])) or "--steps=128"  # the first sweep's budget
        base = r.get("base_overall", result.get("base_overall"))  # the first sweep kept one value
        lines.append(f"| {name} | `{' '.join(r['flags']) or '(none)'}` | `{budget}` | {100 * base:.2f} | {len(gains)} | "
                     + ", ".join(f"{g:+.2f}" for g in gains) + f" | {np.mean(gains):+.2f} | "
                     + ", ".join(f"{a:.3f} -> {b:.3f}" for a, b in r["train_first_last"])
                     + f" | {np.mean(r['wall_s']):.0f} | "
                     + (", ".join(f"{x:g}" for x in r["loadavg"]) if r.get("loadavg") else "n/a") + " |")
    if result.get("partial"):
        lines += ["", f"**PARTIAL**: {result['partial']}"]
    if notes[1]:
        lines += ["", notes[1] + notes[2].rstrip("\n")]
    md.write_text("\n".join(lines) + "\n")


def merge(result: dict, other: dict) -> None:
    """Adds ``other``'s runs to ``result`` (per setting, seeds appended; commands joined)."""
    result["command"] += f"` then `{other['command']}"
    for name, r in other["settings"].items():
        mine = result["settings"].get(name)
        if mine is None:
            result["settings"][name] = r
            continue
        if mine.get("budget") != r.get("budget"):
            raise SystemExit(f"--merge: setting {name!r} ran with budget {r.get('budget')}, here "
                             f"{mine.get('budget')}: give it another name")
        for key in ("gains", "train_first_last", "wall_s", "seeds", "loadavg"):
            mine.setdefault(key, []).extend(r.get(key, []))


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if args.merge:
        result = json.loads((results / f"{args.tag}.json").read_text())
        for path in args.merge.split(","):
            merge(result, json.loads(Path(path).read_text()))
        write(result, results, args.tag)
        return result
    names = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; known: {sorted(SETTINGS)}")
    command = shlex.join(["python", "experiments/toyworld/power_sweep.py", *(argv if argv is not None else sys.argv[1:])])
    previous = results / f"{args.tag}.json"
    if args.append and previous.exists():
        result = json.loads(previous.read_text())
        result["command"] += f"` then `{command}"
    else:
        result = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                  "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "settings": {}}
    todo = [(n, s) for n in names for s in args.seeds.split(",") if s]
    for k, (name, seed) in enumerate(todo):
        flags = SETTINGS[name]
        run_args = ["--arms=verifier", f"--seeds={seed}", f"--steps={args.steps}", "--official_eval=0",
                    "--plots=0", f"--results={Path(args.workdir) / 'study_out'}", f"--tag={name}_s{seed}",
                    f"--workdir={Path(args.workdir) / 'work'}", *FIRST_TESTBED, *args.common.split(), *flags]
        t0 = time.perf_counter()
        out = study.main(run_args)
        s = out["summary"]["verifier"]
        r = result["settings"].setdefault(name, {"flags": flags, "gains": [], "train_first_last": [],
                                                  "wall_s": [], "seeds": [], "loadavg": []})
        r["budget"] = [f"--steps={args.steps}", *args.common.split()]
        r.setdefault("loadavg", []).append(round(os.getloadavg()[0], 1))
        r["gains"] += s["heldout_overall_delta"]["values"]
        r["train_first_last"].append((s["train_verifier_first"]["values"][0], s["train_verifier_last"]["values"][0]))
        r["wall_s"].append(time.perf_counter() - t0)
        r["seeds"].append(int(seed))
        r["base_overall"] = out["base_eval"]["table"]["overall"]  # depends on --eval_per_dim
        result["partial"] = None if k + 1 == len(todo) else f"{k + 1} of {len(todo)} runs done"
        write(result, results, args.tag)
        print(f"[power] {name} seed {seed}: held-out gain {100 * r['gains'][-1]:+.2f} points", flush=True)
    return result


if __name__ == "__main__":
    main()
