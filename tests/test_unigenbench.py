"""UniGenBench as its authors score it: the real release files, a fake judge, the official rules.

The release copy lives next to the repository (``../shared/unigenbench``); the
tests that read it skip with a message when it is absent.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import prefgrpo_jax.toyworld.reward  # noqa: F401 (registers the verifier rewards tiny.py names)
from prefgrpo_jax import config as config_lib, evaluate, unigenbench
from test_judge import MODEL, FakeJudgeServer
from test_train import load_tiny_config

UGB = Path(__file__).resolve().parents[1].parent / "shared" / "unigenbench"
needs_release = pytest.mark.skipif(
    not (UGB / "data" / "test_prompts_en.csv").is_file(),
    reason=f"the UniGenBench release copy is not at {UGB} (see the issue: ../shared/unigenbench)")


# -- the fake judge ---------------------------------------------------------------------------


def asked_testpoints(body: dict) -> tuple[str, list[str]]:
    """(prompt, testpoint names) of an official request, read back from its text."""
    text = body["messages"][0]["content"][-1]["text"]
    prompt = re.search(r"<prompt>(.*?)</prompt>", text, re.DOTALL).group(1)
    return prompt, ast.literal_eval(re.search(r"<checkpoint>(.*?)</checkpoint>", text, re.DOTALL).group(1))


def verdict(prompt: str, testpoint: str) -> int:
    """The fake judge's rule: a deterministic mix of passes and fails."""
    return int((len(prompt) + len(testpoint)) % 3 != 0)


def official_reply(prompt: str, testpoints: list[str], scores: list[int] | None = None) -> str:
    scores = [verdict(prompt, t) for t in testpoints] if scores is None else scores
    analysis = [f"checked {t}" for t in testpoints]
    return (f"<description><prompt>{prompt}</prompt><checkpoint>{testpoints}</checkpoint>"
            f"<analysis>{analysis}</analysis><score>{scores}</score></description>")


@pytest.fixture
def server():
    srv = FakeJudgeServer()
    yield srv
    srv.stop()


# -- reading the clone ------------------------------------------------------------------------


def official_build_system_prompt():
    """eval_common.build_system_prompt with its constants, run here (in the tests only)."""
    tree = ast.parse((UGB / unigenbench.COMMON_FILE).read_text(encoding="utf-8"))
    keep = [n for n in tree.body if (isinstance(n, ast.Assign) and n.targets[0].id.isupper())
            or (isinstance(n, ast.FunctionDef) and n.name == "build_system_prompt")]
    namespace: dict = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "eval_common", "exec"), namespace)
    return namespace["build_system_prompt"]


@needs_release
def test_release_loads_with_its_quirk_warned():
    protocol, items, issues = unigenbench.load_set(UGB, "en")
    assert len(items) == 600 and sum(len(it.testpoints) for it in items) == 1813
    assert len({unigenbench.primary_dimension(t) for it in items for t in it.testpoints}) == 10
    assert len({t for it in items for t in it.testpoints}) == 27
    assert len(protocol.definitions) == 27 and "{prompt}" in protocol.template
    # Row 383's empty description: kept (5 testpoints, one empty description) and reported.
    row = next(it for it in items if it.index == 383)
    assert len(row.testpoints) == 5 and row.descriptions[-1] == ""
    assert [(i["row"], i["index"]) for i in issues] == [(383, 383)]
    assert "test_prompts_en.csv" in issues[0]["file"] and "kept" in issues[0]["handling"]


@needs_release
def test_request_text_is_the_official_build_system_prompt():
    """Our request equals eval_common.build_system_prompt on the same row (run here, in the test only)."""
    protocol, items, _ = unigenbench.load_set(UGB, "en", limit=5)
    official = official_build_system_prompt()
    for item in items:
        want = official(item.prompt, list(item.testpoints), list(item.descriptions), "en")
        assert unigenbench.request_text(protocol, item) == want


@needs_release
def test_chinese_set_uses_its_own_columns_keys_and_template(tmp_path):
    """A zh_long file in the release's zh layout (Chinese keys): loaded, scored by "-" prefix,
    and asked with the official zh prompt."""
    root = tmp_path / "UniGenBench"
    (root / "eval" / "src").mkdir(parents=True)
    (root / "data").mkdir()
    shutil.copy(UGB / unigenbench.COMMON_FILE, root / unigenbench.COMMON_FILE)
    dims = {"考点": ["属性-数量", "风格"], "考点对应描述": ["三只猫", "水墨画"]}
    with (root / "data" / "test_prompts_zh_long.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "prompt_zh", "sub_dims_zh"])
        writer.writerow([0, "水墨画风格的三只猫", json.dumps(dims, ensure_ascii=False)])
    protocol, items, issues = unigenbench.load_set(root, "zh_long")
    assert issues == [] and items[0].testpoints == ("属性-数量", "风格")
    assert [unigenbench.primary_dimension(t) for t in items[0].testpoints] == ["属性", "风格"]
    want = official_build_system_prompt()(items[0].prompt, list(dims["考点"]), list(dims["考点对应描述"]), "zh")
    assert unigenbench.request_text(protocol, items[0]) == want


def test_constants_are_read_without_running_the_file(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\nA = {'x': 1}\nT = 'hi {name}'\nC = {'a': A, 't': T}\n"
                   "D = os.system('exit 3')\nE = [i for i in range(3)]\n")
    consts = unigenbench.read_literal_constants(src)
    assert consts == {"A": {"x": 1}, "T": "hi {name}", "C": {"a": {"x": 1}, "t": "hi {name}"}}


@needs_release
def test_quirky_rows_warned_by_file_and_row_never_crash(tmp_path, caplog):
    root = tmp_path / "UniGenBench"
    (root / "eval" / "src").mkdir(parents=True)
    (root / "data").mkdir()
    shutil.copy(UGB / unigenbench.COMMON_FILE, root / unigenbench.COMMON_FILE)
    with (UGB / "data" / "test_prompts_en.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:4]
    rows[1]["sub_dims_en"] = rows[1]["sub_dims_en"][:-2]  # malformed JSON
    dims = json.loads(rows[2]["sub_dims_en"])
    dims["Testpoint Description"] = dims["Testpoint Description"][:1]  # fewer descriptions
    dims["Testpoints"][0] = "Attribute - Smell"  # no definition
    rows[2]["sub_dims_en"] = json.dumps(dims)
    path = root / "data" / "test_prompts_en.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["index", "prompt_en", "sub_dims_en"])
        writer.writeheader()
        writer.writerows(rows)
    with caplog.at_level(logging.WARNING):
        protocol, items, issues = unigenbench.load_set(root, "en")
    assert [it.index for it in items] == [0, 2, 3]  # the malformed row is out, the others complete
    bad = [i for i in issues if i["row"] == 1]
    assert len(bad) == 1 and "not valid JSON" in bad[0]["problem"] and "left out" in bad[0]["handling"]
    assert f"{path} row 1 (index 1): sub_dims_en is not valid JSON" in caplog.text
    short = items[1]
    assert len(short.testpoints) == len(dims["Testpoints"]) and short.descriptions[1:] == ("",) * (len(short.testpoints) - 1)
    assert {i["problem"].split(" ")[-1] for i in issues if i["row"] == 2} >= {"descriptions", "eval/src/eval_common.py"}
    assert "Attribute - Smell: \n" in unigenbench.request_text(protocol, short)  # kept, empty definition


def test_missing_clone_names_the_field(tmp_path):
    with pytest.raises(unigenbench.UniGenBenchError, match="config.eval.unigenbench_dir=.*CodeGoat24/UniGenBench"):
        unigenbench.load_set(tmp_path, "en")
    with pytest.raises(unigenbench.UniGenBenchError, match="config.eval.unigenbench_set='fr'"):
        unigenbench.load_set(tmp_path, "fr")


# -- replies and scoring ----------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    (official_reply("p", ["A - b", "C"], [1, 0]), [1, 0]),
    ("<analysis>['x', 'y']</analysis> ... <score>[1, 1]</score>", [1, 1]),
    ("<analysis>['x', 'y']</analysis><score>1, 0</score>", [1, 0]),  # a tuple literal, as official
    ("<analysis>['x']</analysis><score>[1, 0]</score>", None),  # wrong length
    ("<analysis>['x', 'y']</analysis><score>[1]</score>", None),  # wrong length
    ("<score>[1, 0]</score>", None),  # no analysis
    ("<analysis>['x', 'y']</analysis><score>[1, oops]</score>", None),
    ("<analysis>['x', 'y']</analysis><score>3</score>", None),
    (None, None),
])
def test_parse_reply(text, want):
    parsed = unigenbench.parse_reply(text, 2)
    assert (parsed[1] if parsed else None) == want


def test_wrong_length_is_retried_and_a_never_parsing_image_is_skipped(server):
    from prefgrpo_jax.rewards.judge import VLMJudge

    item = unigenbench.Item(7, "two cats", ("Attribute - Quantity", "Style"), ("two cats", "photo"))
    protocol = unigenbench.Protocol("en", "{prompt}|{testpoint}|{explanation}|{test_explanation}", {}, "", "",
                                    "", "", "D", "E")

    def script(body, headers, index):
        return "<analysis>['a']</analysis><score>[1]</score>" if index == 0 else \
            "<analysis>['a', 'b']</analysis><score>[1, 0]</score>"

    server.script = script
    image = np.full((8, 8, 3), 0.5, np.float32)
    with VLMJudge(server.url, MODEL, timeout_s=5, backoff_s=0.0) as judge:
        ok = unigenbench.judge_image(judge, protocol, item, image, "7_0.png", max_retries=3)
        server.script = lambda body, headers, index: "<score>[1, 0, 1]</score>"
        bad = unigenbench.judge_image(judge, protocol, item, image, "7_1.png", max_retries=3)
    assert ok["attempts"] == 2 and ok["result_json"]["score"] == [1, 0]
    assert bad["attempts"] == 4 and bad["result_json"] is None and bad["output"] == "<score>[1, 0, 1]</score>"
    assert server.bodies[0]["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    summary = unigenbench.score_results([ok, bad])
    assert (summary["images_judged"], summary["images_skipped"]) == (1, 1)
    assert summary["primary_dimensions"] == {"Attribute": {"correct": 1, "total": 1, "accuracy": 1.0},
                                             "Style": {"correct": 0, "total": 1, "accuracy": 0.0}}
    assert summary["overall"] == 0.5


# -- end to end -------------------------------------------------------------------------------


def official_rescore(csv_path: Path) -> tuple[dict, dict]:
    """UniGenBench's calculate_scores rules, written here: (primary, sub) -> [correct, total]."""
    primary: dict = {}
    sub: dict = {}
    with csv_path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                points = ast.literal_eval(row["testpoint"])
                scores = ast.literal_eval(row["result_json"])["score"]
            except (ValueError, SyntaxError, TypeError):
                continue  # "null": the official script skips the row
            for point, score in zip(points, scores):
                big = point.split("-", 1)[0].strip() if "-" in point else point
                for table, name in ((primary, big), (sub, point)):
                    table.setdefault(name, [0, 0])
                    table[name][0] += score == 1
                    table[name][1] += 1
    return primary, sub


@needs_release
def test_eval_on_real_rows_matches_hand_count_and_official_rescoring(tiny_flux_dir, tmp_path, server):
    with (UGB / "data" / "test_prompts_en.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:4]
    never = rows[3]["prompt_en"]  # the judge never answers this prompt in the official format
    retried = rows[2]["prompt_en"]  # its first reply has a wrong-length list
    seen: set = set()

    def script(body, headers, index):
        prompt, points = asked_testpoints(body)
        if prompt == never:
            return "<analysis>['?']</analysis><score>[1]</score>"
        if prompt == retried and prompt not in seen:
            seen.add(prompt)
            return official_reply(prompt, points, [1] * (len(points) + 1))
        return official_reply(prompt, points)

    server.script = script
    c = load_tiny_config()
    c.model.path = str(tiny_flux_dir)
    c.eval.judge = "unigenbench"
    c.eval.unigenbench_dir = str(UGB)
    c.eval.vlm_judge.base_url = server.url
    c.eval.vlm_judge.model = MODEL
    c.eval.batch_size = 4
    u = c.eval.unigenbench
    u.limit, u.images_per_prompt, u.height, u.width, u.num_steps = 4, 2, 32, 32, 2
    u.max_sequence_length, u.max_retries = 8, 2
    report = evaluate.evaluate(c, tmp_path / "work")

    # Hand count: rows 0-2, two images each, the fake judge's rule; row 3 skipped twice.
    primary: dict = {}
    for r in rows[:3]:
        for point in json.loads(r["sub_dims_en"])["Testpoints"]:
            name = point.split("-", 1)[0].strip() if "-" in point else point
            counts = primary.setdefault(name, [0, 0])
            counts[0] += 2 * verdict(r["prompt_en"], point)
            counts[1] += 2
    assert {k: [v["correct"], v["total"]] for k, v in report["primary_dimensions"].items()} == primary
    assert (report["images_judged"], report["images_skipped"], report["images"]) == (6, 2, 8)
    np.testing.assert_allclose(report["overall"], np.mean([c / t for c, t in primary.values()]))
    assert report["scores"]["overall"] == report["overall"]

    # Files: {index}_{j}.png, the official result CSV, JSON and markdown.
    root = tmp_path / "work" / "eval" / "unigenbench_en"
    assert sorted(p.name for p in (root / "base").glob("*.png")) == [f"{i}_{j}.png" for i in range(4) for j in range(2)]
    csv_path = root / "results" / "base_en.csv"
    with csv_path.open(newline="", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == list(unigenbench.RESULT_COLUMNS) and len(written) == 8
    assert sum(r["result_json"] == "null" for r in written) == 2
    again_primary, again_sub = official_rescore(csv_path)
    assert again_primary == primary
    assert again_sub == {k: [v["correct"], v["total"]] for k, v in report["sub_dimensions"].items()}
    saved = json.loads(csv_path.with_suffix(".json").read_text())
    assert saved["primary_dimensions"] == report["primary_dimensions"] and saved["images_skipped"] == 2
    md = csv_path.with_suffix(".md").read_text()
    assert "6 images judged, 2 skipped" in md and "| overall |" in md

    # Each image of a prompt shares its noise seed with the same image of every prompt; the
    # seeds differ between images, so image 0 and image 1 of a prompt differ.
    a, b = (unigenbench.read_image(root / "base" / f"0_{j}.png") for j in range(2))
    assert np.abs(a - b).max() > 0


@needs_release
def test_eval_stops_before_sampling_when_the_judge_does_not_answer(tmp_path, server):
    server.models_reply = (404, b'{"detail": "Not Found"}')
    c = load_tiny_config()
    c.eval.judge = "unigenbench"
    c.eval.unigenbench_dir = str(UGB)
    c.eval.vlm_judge.base_url = server.url
    c.eval.vlm_judge.model = MODEL
    from prefgrpo_jax.rewards.judge import JudgeUnavailableError

    with pytest.raises(JudgeUnavailableError, match="(?s)not ready.*fix: .*eval.vlm_judge.base_url must be the server root"):
        evaluate.evaluate(c, tmp_path)
    assert not (tmp_path / "eval").exists()


@needs_release
def test_periodic_eval_on_unigenbench_logs_primary_dimensions(tiny_flux_dir, server, tmp_path):
    """eval.every with the UniGenBench judge: the primary dimensions of the subset, skips counted."""
    server.script = lambda body, headers, index: official_reply(*asked_testpoints(body))
    c = load_tiny_config()
    c.model.path = str(tiny_flux_dir)
    c.train.max_sequence_length = 8
    c.eval.judge = "unigenbench"
    c.eval.unigenbench_dir = str(UGB)
    c.eval.vlm_judge.base_url = server.url
    c.eval.vlm_judge.model = MODEL
    c.eval.unigenbench.limit = 6
    c.eval.every_prompts, c.eval.num_steps, c.eval.batch_size = 3, 2, 3
    periodic = evaluate.PeriodicEval(c)
    assert periodic.index == [0, 2, 5]
    from prefgrpo_jax.state import load_trained_pipeline

    metrics = periodic(load_trained_pipeline(config_lib.RunConfig.from_dict(c), tmp_path)[0])  # no checkpoint: base weights
    with (UGB / "data" / "test_prompts_en.csv").open(newline="", encoding="utf-8") as f:
        rows = [r for k, r in enumerate(csv.DictReader(f)) if k in (0, 2, 5)]
    points = [(r["prompt_en"], p) for r in rows for p in json.loads(r["sub_dims_en"])["Testpoints"]]
    primaries = {unigenbench.primary_dimension(p) for _, p in points}
    assert set(metrics) == {f"eval/{d}" for d in primaries} | {"eval/overall", "eval_images_skipped", "eval_time_s"}
    for dim in primaries:
        mine = [verdict(prompt, p) for prompt, p in points if unigenbench.primary_dimension(p) == dim]
        assert metrics[f"eval/{dim}"] == pytest.approx(np.mean(mine), abs=1e-4)
    assert metrics["eval_images_skipped"] == 0.0
