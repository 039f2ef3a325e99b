"""Smoke test of the toy-world study's code path (every arm kind, one noise level) at the tiniest size.

Runs on the random fixture pipeline: the numbers mean nothing, the structure of
the results file does.
"""

import json

import numpy as np
import pytest

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle",
           "a red square and a blue circle"]


def test_measurements():
    from experiments.toyworld.study import group_diversity, pair_fidelity

    imgs = np.zeros((1, 3, 2, 2, 3))
    imgs[0, 1] = 1.0
    # pairs (0,1): 1, (0,2): 0, (1,2): 1 -> mean 2/3
    assert group_diversity(imgs) == pytest.approx(2 / 3)
    truth = np.array([[0.0, 1.0, 0.5]])
    assert pair_fidelity(np.array([[0.1, 0.9, 0.5]]), truth) == (1.0, 3)
    assert pair_fidelity(np.array([[0.9, 0.1, 0.5]]), truth)[0] == pytest.approx(0.0)
    p = np.full((1, 3, 3), 0.5)
    assert pair_fidelity(p, truth)[0] == pytest.approx(0.5)  # a judge of ties only
    p[0, 1, 0], p[0, 0, 1] = 0.8, 0.2
    assert pair_fidelity(p, truth)[0] == pytest.approx(2 / 3)


def test_make_pairs():
    from experiments.toyworld.train_proxies import make_pairs

    scores = np.array([[0.0, 1.0, 1.0, 0.5]] * 50)
    rng = np.random.default_rng(0)
    clean = make_pairs(scores, rng, label_noise=0.0, ties="drop")
    assert len(clean["label"]) == 50 * 5  # 6 pairs per group, one tie dropped
    winner = np.where(clean["label"] == 1, clean["a"], clean["b"])
    loser = np.where(clean["label"] == 1, clean["b"], clean["a"])
    assert np.all(scores[clean["group"], winner] > scores[clean["group"], loser])
    assert 0.3 < np.mean(clean["a"] > clean["b"]) < 0.7  # random presentation order
    noisy = make_pairs(scores, np.random.default_rng(1), label_noise=0.2, ties="half")
    assert len(noisy["label"]) == 50 * 6 and np.sum(noisy["clean"] == 0.5) == 50
    assert np.all(noisy["label"][noisy["clean"] == 0.5] == 0.5)
    assert np.array_equal(noisy["flipped"], noisy["label"] != noisy["clean"])
    assert 0.1 < noisy["flipped"][noisy["clean"] != 0.5].mean() < 0.3


def _save_random_proxies(directory):
    """Untrained tiny proxies (train_proxies.py is exercised by test_make_pairs and the
    study's own runs; training here would only add compile time)."""
    from flax import nnx

    from experiments.toyworld.train_proxies import toy_tokenizer
    from prefgrpo_jax.rewards.pairwise import (
        RewardModelConfig, ToyBackboneConfig, build_reward_model, save_reward_model)

    tok = toy_tokenizer()
    for kind in ("pairwise", "pointwise"):
        cfg = RewardModelConfig(kind=kind, hidden=16, toy=ToyBackboneConfig(
            vocab_size=tok.vocab_size, channels=(8, 8), feature_dim=16))
        save_reward_model(build_reward_model(cfg, rngs=nnx.Rngs(0)), directory / f"reward_{kind}",
                          tokenizer=tok, extra={"data_label_noise": 0.2, "data_ties": "drop"})


@pytest.fixture
def session_cache_config():
    """study.main points JAX's compilation cache at its workdir and caches only compiles
    over 0.5 s: give the later tests of this process back the session's settings."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.mark.slow  # five 1-step GRPO runs (one per arm kind) with their compiles: ~2 CPU-minutes
def test_study_smoke(tiny_flux_dir, tmp_path, session_cache_config):
    from experiments.toyworld import study

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "category": "x"}) + "\n" for p in PROMPTS))
    proxies = tmp_path / "proxies"
    _save_random_proxies(proxies)

    results = tmp_path / "results"
    study.main([
        f"--base={tiny_flux_dir}", f"--prompts={prompts}", f"--proxies={proxies}",
        f"--results={results}", f"--workdir={tmp_path / 'work'}", "--tag=smoke", "--seeds=0",
        "--steps=1", "--prompts_per_step=2", "--group_size=4", "--sample_steps=2",
        "--timestep_fraction=1.0", "--timestep_chunk=1", "--sde_window=1", "--sde_window_range=0,1",
        "--eval_per_dim=1", "--eval_steps=2",
        "--official_eval=0", "--plots=1", "--noise=0.2",
    ])
    arms = study.expand_arms(list(study.ARMS), [0.2])
    data = json.loads((results / "smoke.json").read_text())
    assert data["meta"]["arms"] == arms == ["verifier", "pointwise", "pairwise", "noisy_pointwise@0.2",
                                            "noisy_pairwise@0.2"]
    assert data["meta"]["partial"] is None and data["meta"]["runs_completed"] == 5
    assert set(data["base_eval"]["table"]) >= {"colour", "shape", "count", "position", "binding", "overall"}
    for arm in arms:
        run = data["runs"][arm]["0"]
        assert [r["step"] for r in run["curve"]] == [1]
        row = run["curve"][0]
        for key in ("reward_mean", "reward/pointwise_model/reward_mean", "reward/pairwise_model/win_rate_mean",
                    f"reward/{study.training_source(arm, 'verifier')}/group_std",
                    f"reward/{study.training_source(arm, 'verifier')}/adv_spread",
                    "diversity/pixel_rms", "fidelity/pointwise_model", "fidelity/pairwise_model"):
            assert key in row, (arm, key)
        assert row["reward/pairwise_model/win_rate_mean"] == pytest.approx(0.5)
        src = study.training_source(arm, "verifier")
        assert f"mech/amplification/{src}" in row
        if arm != "verifier":
            assert {f"mech/corr/{src}", f"mech/noise_share/{src}"} <= set(row), arm
        assert set(run["evals"]) == {"1"}
        ev = run["evals"]["1"]
        assert {"table", "pointwise_proxy_mean", "pairwise_proxy_pref_over_base",
                "verifier_winrate_over_base"} <= set(ev)
        assert data["summary"][arm]["heldout_overall_final"]["values"] == [ev["table"]["overall"]]
        assert data["configs"][arm]["reward"]["spec"] == study.arm_spec(arm, "verifier")
    assert data["runs"]["noisy_pairwise@0.2"]["0"]["evals"]["1"]["judge_error_delta"] is not None
    dec = data["decision"]
    assert dec["seeds_per_arm"] == 1 and dec["conclusion"].startswith("not applied")  # 1 seed < 5
    assert set(dec["levels"]) == {"0.2"} and "learned_difference" in dec
    md = (results / "smoke.md").read_text()
    for text in ("What the numbers show", "Reproduce", "REDUCED RUN", "Decision rule", "Noise sweep",
                 "The mechanism", "Conclusion"):
        assert text in md, text
    for f in data["files"]:
        assert (results / f.split("/")[-1]).is_file(), f
    # --render_only rewrites the report from the json alone, to the same decision
    (results / "smoke.md").unlink()
    again = study.main([f"--results={results}", "--tag=smoke", "--render_only=1", "--plots=0"])
    assert again["decision"]["conclusion"] == dec["conclusion"]
    assert again["decision"]["levels"]["0.2"]["pairwise"][0] == pytest.approx(dec["levels"]["0.2"]["pairwise"][0])
    assert "Conclusion" in (results / "smoke.md").read_text()


def _summary(gains: dict[str, list[float]]) -> dict:
    """A ``summarise``-shaped dict holding only the held-out gains (fractions, not points)."""
    return {arm: {"heldout_overall_delta": {"values": [g / 100 for g in v]}} for arm, v in gains.items()}


def test_decision_rule():
    from experiments.toyworld.study import comparison_verdict, decide, t_interval, welch_interval

    m, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.303 * 1 / np.sqrt(3), rel=1e-3)  # t_{0.975, 2} = 4.303
    d, lo, hi = welch_interval([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert d == 0.0 and lo < 0 < hi
    up, flat = (1.0, 0.5, 1.5), (0.1, -0.4, 0.6)
    assert comparison_verdict([up, up, flat]) == "pairwise resists hacking better"
    assert comparison_verdict([up, flat, flat]) == "no difference detected"  # not a majority
    assert comparison_verdict([up, up, (-1.0, -1.5, -0.5)]) == "no difference detected"  # contradicted
    assert comparison_verdict([(-1.0, -1.5, -0.5)] * 2 + [flat]) == "pointwise better"

    seeds5 = [20.0, 18.0, 22.0, 19.0, 21.0]
    strong = {"verifier": seeds5, **{f"noisy_pairwise@{s}": [10.0, 11.0, 9.0, 10.5, 9.5] for s in (0.1, 0.4)},
              **{f"noisy_pointwise@{s}": [1.0, 0.0, 2.0, 1.5, 0.5] for s in (0.1, 0.4)}}
    dec = decide(_summary(strong), [0.1, 0.4])
    assert dec["conclusion"] == "pairwise resists hacking better" and dec["verifier_all_seeds_up"]
    assert dec["levels"]["0.1"]["difference"][0] == pytest.approx(9.0)
    same = dict(strong, **{f"noisy_pointwise@{s}": strong["noisy_pairwise@0.1"] for s in (0.1, 0.4)})
    assert decide(_summary(same), [0.1, 0.4])["conclusion"].startswith("no difference detected")
    weak = dict(strong, verifier=[2.0, -1.0, 1.0, -2.0, 0.5])
    assert decide(_summary(weak), [0.1, 0.4])["conclusion"].startswith("inconclusive: no power")
    few = {k: v[:3] for k, v in strong.items()}
    assert decide(_summary(few), [0.1, 0.4])["conclusion"].startswith("not applied: 3 seed(s)")


def test_balanced_prompt_file(tmp_path):
    from experiments.toyworld.study import balanced_prompt_file

    rows = ["a red circle", "a blue square", "a green triangle left of a yellow circle",
            "a red square left of a blue circle", "a red circle above a green square", "two blue squares"]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "category": "x"}) + "\n" for p in rows))
    out = [json.loads(line) for line in balanced_prompt_file(src, tmp_path / "b.jsonl").read_text().splitlines()]
    dims = [r["category"] for r in out]
    # three position prompts set the count; colour's two are cycled, count's one repeated
    assert {d: dims.count(d) for d in set(dims)} == {"colour": 3, "position": 3, "count": 3}
    assert [r["prompt"] for r in out if r["category"] == "colour"] == ["a red circle", "a blue square", "a red circle"]
    assert {r["prompt"] for r in out if r["category"] == "position"} == set(rows[2:5])


def test_power_sweep_merge_and_notes(tmp_path):
    from experiments.toyworld import power_sweep

    def sweep(command, gains, budget):
        return {"command": command, "machine": "m", "settings": {"s": {
            "flags": ["--lr=2e-4"], "budget": budget, "base_overall": 0.25, "gains": gains,
            "train_first_last": [(0.3, 0.4)] * len(gains), "wall_s": [1.0] * len(gains),
            "seeds": list(range(len(gains))), "loadavg": [1.0] * len(gains)}}}

    result = sweep("a", [0.04], ["--steps=80"])
    power_sweep.merge(result, sweep("b", [0.02], ["--steps=80"]))
    assert result["command"] == "a` then `b" and result["settings"]["s"]["gains"] == [0.04, 0.02]
    with pytest.raises(SystemExit, match="budget"):  # one row per budget
        power_sweep.merge(result, sweep("c", [0.1], ["--steps=160"]))
    (tmp_path / "t.md").write_text(f"old table\n\n{power_sweep.NOTES}\n\nkept by hand\n")
    power_sweep.write(result, tmp_path, "t")
    md = (tmp_path / "t.md").read_text()
    assert "old table" not in md and md.rstrip().endswith("kept by hand")
    assert "| +4.00, +2.00 | +3.00 |" in md and "25.00" in md


def test_diagnose_group_stats():
    from experiments.toyworld.diagnose_power import group_stats

    s = group_stats(np.array([[0.5, 0.5, 0.5], [0.0, 1.0, 1.0]]))
    assert s["flat_group_frac"] == 0.5
    assert s["strict_pair_frac"] == pytest.approx(2 / 6)  # group 2: (0,1), (0,2) strict, (1,2) tied
    assert s["group_std"] == pytest.approx(np.std([0.0, 1.0, 1.0]) / 2)
