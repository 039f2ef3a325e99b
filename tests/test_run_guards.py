"""Stop policies and resume checks (units; the end-to-end runs are in test_faults.py)."""

import logging
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from prefgrpo_jax import config as config_lib, run_guards, train
from prefgrpo_jax.checkpoint import Checkpointer
from prefgrpo_jax.run_guards import NoRewardSignalError, SignalWatch


def flat(spread, tie=None, **extra):
    m = {"reward/vlm_judge/adv_spread": spread, "reward/vlm_judge/reward_std": 0.0}
    if tie is not None:
        m["reward/vlm_judge/tie_frac"] = tie
    m.update(extra)
    return m


def test_signal_watch_stops_after_n_flat_steps_naming_source_and_replies():
    watch = SignalWatch({"vlm_judge": 1.0, "verifier": 0.0}, limit=3)
    judge = {"vlm_judge/judge_requests": 12.0, "vlm_judge/judge_failed": 0.0, "vlm_judge/judge_unparseable": 12.0}
    watch.update(flat(0.0, 1.0, **judge))
    watch.update(flat(0.0, 1.0, **judge))
    watch.update(flat(1.2, 0.1))  # a step with signal resets the count
    watch.update(flat(0.0, 1.0, **judge))
    watch.update(flat(0.0, 1.0, **judge))
    with pytest.raises(NoRewardSignalError) as err:
        watch.update(flat(0.0, 1.0, **judge))
    msg = str(err.value)
    assert "reward source 'vlm_judge'" in msg and "3 consecutive steps" in msg
    assert "100% of pairs tied" in msg and "12 judge requests" in msg and "12 had no parseable verdict" in msg
    assert "config.train.max_steps_without_signal" in msg


def test_signal_watch_ignores_weight_zero_sources_and_limit_zero():
    watch = SignalWatch({"a": 1.0, "b": 0.0}, limit=1)
    watch.update({"reward/a/adv_spread": 0.5, "reward/b/adv_spread": 0.0})
    never = SignalWatch({"a": 1.0}, limit=0)
    for _ in range(50):
        never.update({"reward/a/adv_spread": 0.0})


def test_config_changes_split_experiment_from_harmless():
    saved = config_lib.base_config().to_dict()
    c = config_lib.base_config()
    c.train.group_size = 4
    c.optim.learning_rate = 3e-5
    c.train.num_steps = 10
    c.reward.spec = {"vlm_judge": 0.5, "clip": 0.5}
    c.log_every = 5
    c.train.micro_batches = 2
    c.total_steps = 1000
    experiment, other = run_guards.config_changes(saved, c.to_dict())
    assert experiment == [
        "optim.learning_rate: 1e-05 -> 3e-05",
        "reward.spec.clip: '<absent>' -> 0.5",
        "reward.spec.vlm_judge: 1.0 -> 0.5",
        "train.group_size: 8 -> 4",
        "train.num_steps: 25 -> 10",
    ]
    assert other == ["log_every: 1 -> 5", "total_steps: 320 -> 1000", "train.micro_batches: 4 -> 2"]


def test_resume_config_refused_unless_allowed(caplog):
    saved = config_lib.base_config().to_dict()
    c = config_lib.base_config()
    c.train.group_size = 4
    c.image_every = 7
    with pytest.raises(config_lib.ConfigError, match=r"checkpoint 3 in /ck was trained with.*\n  train.group_size: 8 -> 4\n.*allow_config_change=True"):
        run_guards.check_resume_config(saved, c, "checkpoint 3 in /ck")
    c.allow_config_change = True
    with caplog.at_level(logging.INFO):
        run_guards.check_resume_config(saved, c, "checkpoint 3 in /ck")
    assert "config changed on resume (allow_config_change=True): train.group_size: 8 -> 4" in caplog.messages
    assert "config changed on resume: image_every: 20 -> 7" in caplog.messages
    c = config_lib.base_config()
    c.log_every = 3  # harmless alone: passes without allow_config_change
    run_guards.check_resume_config(saved, c, "checkpoint 3 in /ck")


def test_tree_all_finite():
    assert run_guards.tree_all_finite({"a": jnp.ones(3), "n": jnp.arange(3)})
    assert not run_guards.tree_all_finite({"a": jnp.ones(3), "b": jnp.asarray([0.0, jnp.nan])})
    assert not run_guards.tree_all_finite([jnp.asarray([jnp.inf], jnp.bfloat16)])


def test_no_checkpoint_inside_a_nonfinite_streak_or_from_nan_params(tmp_path):
    ck = Checkpointer(tmp_path, keep=5, save_every=1)
    trainer = SimpleNamespace(checkpointer=ck, state={"params": {"w": jnp.ones(4)}}, meta=lambda step: {"step": step})
    save = train.Trainer.save_checkpoint
    assert save(trainer, 1, force=False, nonfinite_streak=0)
    assert not save(trainer, 2, force=True, nonfinite_streak=1)
    trainer.state = {"params": {"w": jnp.asarray([1.0, np.nan, 0.0, 0.0])}}
    assert not save(trainer, 3, force=True, nonfinite_streak=0)
    assert ck._manager.all_steps() == [1]
    ck.close()


@pytest.mark.parametrize("field, value, message", [
    ("train.max_consecutive_nonfinite", -1, "config.train.max_consecutive_nonfinite=-1: must be an integer >= 0"),
    ("train.max_steps_without_signal", -3, "config.train.max_steps_without_signal=-3: must be an integer >= 0 (0 = never stop)"),
])
def test_guard_fields_are_validated(field, value, message):
    c = config_lib.base_config()
    c.model.path = "/nonexistent"
    section, _, name = field.rpartition(".")
    (c[section] if section else c)[name] = value
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(c)
    assert message in str(err.value)


def test_judge_options_validated_and_a_pasted_key_never_echoed():
    c = config_lib.base_config()  # reward.spec = {"vlm_judge": 1.0} with no options
    with pytest.raises(config_lib.ConfigError, match=r"config.reward.options.vlm_judge is missing: .*base_url"):
        config_lib.validate(c)
    secret = "sk-live-4f9a8b7c6d5e"
    c.reward.options = {"vlm_judge": {"base_url": "http://127.0.0.1:8080", "model": "m", "api_key_env": secret}}
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(c)
    assert "config.reward.options.vlm_judge.api_key_env=<20 characters, not shown>" in str(err.value)
    assert secret not in str(err.value)
    from prefgrpo_jax.rewards.judge import VLMJudge

    with pytest.raises(ValueError) as err:
        VLMJudge("http://127.0.0.1:9", "m", api_key_env=secret)
    assert secret not in str(err.value) and "not the key itself" in str(err.value)
    assert VLMJudge("http://127.0.0.1:9", "m", api_key_env="").api_key_env is None  # flux.py's default


def test_reward_options_that_do_not_fit_name_the_config_field():
    from prefgrpo_jax.rewards import registry

    with pytest.raises(ValueError, match=r"reward 'vlm_judge': its options \(config.reward.options.vlm_judge\) do not fit"):
        registry.build_reward_mix({"vlm_judge": 1.0}, {"vlm_judge": {"base_url": "http://x:1"}})


def test_error_about_a_huge_prompt_does_not_paste_it():
    from prefgrpo_jax.toyworld.scenes import parse_prompt

    prompt = "a red circle " * 7700  # ~100k characters
    with pytest.raises(ValueError) as err:
        parse_prompt(prompt)
    assert len(str(err.value)) < 400 and "(100100 characters)" in str(err.value)


def test_eval_report_json_has_null_not_bare_nan():
    import json

    from prefgrpo_jax.evaluate import _finite_or_null

    report = {"scores": {"Action": float("nan"), "overall": 0.5}, "unjudged": {"Action": 3},
              "per_prompt": [1.0, float("inf")], "name": "x"}
    text = json.dumps(_finite_or_null(report), allow_nan=False)
    assert json.loads(text) == {"scores": {"Action": None, "overall": 0.5}, "unjudged": {"Action": 3},
                                "per_prompt": [1.0, None], "name": "x"}


def test_reward_options_checked_before_loading():
    c = config_lib.base_config()
    c.model.path = "/nonexistent"
    c.reward.spec = {"clip": 1.0}
    c.reward.options = {"clip": {"pth": "/data/clip"}, "vlm_judge": {"base_url": "http://x:1"}}
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(c)
    msg = str(err.value)
    assert "config.reward.options.clip={'pth': '/data/clip'}: got an unexpected keyword argument 'pth'" in msg
    assert "config.reward.options=" in msg and "names sources ['vlm_judge'] that reward.spec ['clip'] does not use" in msg
