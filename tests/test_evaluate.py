"""--mode=eval on the fixture pipeline: the report's structure and its numbers' origin."""

import json

import numpy as np
import pytest

import prefgrpo_jax.toyworld.reward  # noqa: F401 (registers the verifier rewards tiny.py names)
from prefgrpo_jax import config as config_lib, evaluate
from prefgrpo_jax.toyworld.scenes import DIMENSIONS
from test_train import load_tiny_config


def test_eval_writes_per_dimension_table(tiny_flux_dir, tmp_path, monkeypatch):
    c = load_tiny_config()
    c.model.path = str(tiny_flux_dir)
    c.train.max_sequence_length = 8
    c.eval.prompts_per_dimension = 2
    c.eval.num_steps = 2
    c.eval.batch_size = 4
    report = evaluate.evaluate(c, tmp_path)
    assert set(report["scores"]) == set(DIMENSIONS) | {"overall"}
    assert report["images"] == 2 * len(DIMENSIONS)
    assert report["checkpoint_step"] is None  # no checkpoint in the workdir: base weights
    np.testing.assert_allclose(report["scores"]["overall"], np.mean([report["scores"][d] for d in DIMENSIONS]))
    saved = json.loads((tmp_path / "eval" / "base.json").read_text())
    assert saved["scores"] == report["scores"]
    assert "| model | colour |" in (tmp_path / "eval" / "base.md").read_text()
    assert (tmp_path / "eval" / "base.png").is_file()

    # The table is the verifier's: images that are blank score 0 everywhere.
    monkeypatch.setattr(evaluate, "generate", lambda pipe, prompts, config, key: np.zeros((len(prompts), 32, 32, 3), np.float32))
    blank = evaluate.evaluate(c, tmp_path / "blank")
    assert blank["scores"]["overall"] == 0.0


def test_eval_rejects_unknown_judge(tiny_flux_dir, tmp_path):
    c = load_tiny_config()
    c.model.path = str(tiny_flux_dir)
    c.eval.judge = "gemini"
    with pytest.raises(ValueError, match="config.eval.judge='gemini': must be one of"):
        evaluate.evaluate(c, tmp_path)


def write_testpoints(path):
    rows = [
        {"prompt": "a red circle", "dimension": "Attribute",
         "testpoints": ["is there a circle? pass", {"text": "is it red? fail", "dimension": "Color"}]},
        {"prompt": "two blue squares", "dimension": "Attribute",
         "testpoints": ["are the squares blue? pass", "are there two? unanswered"]},
        {"prompt": "a green triangle", "dimension": "Color", "testpoints": ["is it green? pass"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_eval_with_vlm_judge_scores_testpoints_per_dimension(tiny_flux_dir, tmp_path):
    from test_judge import FakeJudgeServer

    def script(body, headers, index):
        """'pass' -> yes, 'fail' -> no, 'unanswered' -> no verdict line."""
        questions = body["messages"][0]["content"][-1]["text"].split("Test points:\n", 1)[1].splitlines()
        lines = [f"{q.split('. ', 1)[0]}: {'yes' if 'pass' in q else 'no'}" for q in questions if "unanswered" not in q]
        return "<answer>" + "\n".join(lines) + "</answer>"

    server = FakeJudgeServer()
    server.script = script
    try:
        c = load_tiny_config()
        c.model.path = str(tiny_flux_dir)
        c.train.max_sequence_length = 8
        c.eval.judge = "vlm_judge"
        c.eval.prompts = str(write_testpoints(tmp_path / "testpoints.jsonl"))
        c.eval.vlm_judge.base_url = server.url
        c.eval.vlm_judge.model = "eval-model"
        c.eval.images_per_prompt = 2
        c.eval.num_steps = 2
        c.eval.batch_size = 4
        report = evaluate.evaluate(c, tmp_path / "work")
    finally:
        server.stop()
    assert len(server.bodies) == 6  # 3 prompts x 2 images, one request each
    assert {b["model"] for b in server.bodies} == {"eval-model"}
    # Attribute: 'circle' and 'blue squares' pass (2 images each), 'two?' unjudged -> 4/4.
    # Color: 'red' fails twice, 'green' passes twice -> 2/4. Overall = mean of the two.
    assert report["scores"] == {"Attribute": 1.0, "Color": 0.5, "overall": 0.75}
    assert report["unjudged"] == {"Attribute": 2, "Color": 0}
    assert report["judge_stats"]["unparseable"] == 2 and report["judge_stats"]["failed"] == 0
    assert "api_key_env" not in report["judge"]
    saved = json.loads((tmp_path / "work" / "eval" / "base.json").read_text())
    assert saved["scores"] == report["scores"]
    assert "| model | Attribute | Color | overall |" in (tmp_path / "work" / "eval" / "base.md").read_text()


@pytest.mark.parametrize("line,message", [
    ("not json", "testpoints.jsonl:1: not valid JSON"),
    ('{"prompt": "x"}', 'testpoints.jsonl:1: needs a non-empty "testpoints" list'),
    ('{"prompt": "x", "testpoints": ["q"]}', "testpoints.jsonl:1: every testpoint needs a question and a dimension"),
    ('{"testpoints": ["q"], "dimension": "d"}', 'testpoints.jsonl:1: needs a non-empty "prompt" string'),
])
def test_testpoint_file_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "testpoints.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        evaluate.load_testpoint_prompts(path)


def test_vlm_judge_eval_config_is_validated(tiny_flux_dir, tmp_path):
    c = load_tiny_config()
    c.model.path = str(tiny_flux_dir)
    c.eval.judge = "vlm_judge"
    c.eval.prompts = str(tmp_path / "missing.jsonl")
    c.eval.vlm_judge.base_url = "127.0.0.1:8080"
    with pytest.raises(ValueError) as err:
        evaluate.evaluate(c, tmp_path)
    text = str(err.value)
    assert "3 invalid config field(s)" in text
    assert f"config.eval.prompts='{tmp_path / 'missing.jsonl'}': must be an existing JSONL file" in text
    assert "config.eval.vlm_judge.base_url='127.0.0.1:8080': must be the judge server's root URL" in text
    assert "config.eval.vlm_judge.model='': must name the model the judge server serves" in text




def test_periodic_eval_scores_a_fixed_spread_subset(tiny_flux_dir, tmp_path):
    """eval.every's scorer: evenly spaced prompts covering every dimension, the same numbers twice."""
    from prefgrpo_jax.state import load_trained_pipeline

    c = load_tiny_config()
    assert c.eval.every > 0 and c.total_steps % c.eval.every == 0  # the tiny run logs evals
    c.model.path = str(tiny_flux_dir)
    c.train.max_sequence_length = 8
    c.eval.every_prompts, c.eval.num_steps, c.eval.batch_size = 5, 2, 5
    periodic = evaluate.PeriodicEval(c)
    specs = evaluate.heldout_set(c)
    assert periodic.index == [0, 25, 50, 74, 99] and len(specs) == 100
    assert [specs[i].dimension for i in periodic.index] == list(DIMENSIONS)
    pipe, _ = load_trained_pipeline(config_lib.RunConfig.from_dict(c), tmp_path)  # no checkpoint: the base weights
    first = periodic(pipe)
    assert set(first) == {f"eval/{d}" for d in DIMENSIONS} | {"eval/overall", "eval_time_s"}
    second = periodic(pipe)
    assert {k: v for k, v in first.items() if k != "eval_time_s"} == \
        {k: v for k, v in second.items() if k != "eval_time_s"}
