"""--mode=eval on the fixture pipeline: the report's structure and its numbers' origin."""

import json

import numpy as np
import pytest

from prefgrpo_jax import evaluate
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
