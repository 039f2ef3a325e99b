"""UniGenBench as its authors score it, read from a clone of their repository.

Everything benchmark-specific comes from the clone (``eval.unigenbench_dir``)
at run time; the project ships none of its text:

* ``data/test_prompts_{set}.csv`` (``set`` in :data:`SETS`): ``index``, the
  prompt and a JSON ``sub_dims`` string whose testpoint list names
  sub-dimensions (``Attribute - Quantity``) and whose description list gives
  the phrase of the prompt each one refers to.
* ``eval/src/eval_common.py``: the judge's prompt template, the definition of
  every sub-dimension and the per-language column / key names
  (``LANG_CONFIGS``). They are read with :mod:`ast` as literal constants; the
  file is never imported or executed.

The protocol follows that file: one judge request per image carrying all of
its testpoints (image first, then the text); the reply must hold
``<analysis>[...]</analysis>`` and ``<score>[...]</score>`` Python lists as long
as the testpoint list; a reply that fails this is asked again, up to
``max_retries`` more times, and an image whose replies never parse is skipped
(left out of the scores and counted). Scoring pools every testpoint of every
judged image: the primary dimension is the part of the name before the first
"-" (stripped; the official JSON keeps the trailing space, the counts are the
same), a testpoint passes when its score equals 1, and the overall score is the
mean of the primary-dimension accuracies (the leaderboard's "overall").

Data quirks of the release never stop a run; each one is logged with its file
and row and listed in the report's ``data_issues``:

* an empty testpoint description: kept; the request shows the testpoint with
  an empty description, as the official code does;
* fewer descriptions than testpoints: the missing ones are empty (the official
  code would crash); extra descriptions are ignored;
* a testpoint with no definition in ``eval_common.py``: kept, with an empty
  definition (the official code raises);
* a row that cannot be judged at all (its ``sub_dims`` JSON does not parse or
  has no testpoint list, the prompt is empty, the index is not an integer):
  left out of generation and scoring (the official code would crash on it).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

SETS = ("en", "en_long", "zh", "zh_long")
COMMON_FILE = Path("eval") / "src" / "eval_common.py"
# The fields of eval_common.LANG_CONFIGS[lang] the protocol needs.
LANG_FIELDS = ("explanation_dict", "system_prompt_template", "prompt_column", "subdim_column",
               "testpoint_key", "desc_key", "checkpoint_header", "checkpoint_desc_header")
RESULT_COLUMNS = ("index", "prompt", "testpoint", "output", "result_json", "img_path")

_ANALYSIS_RE = re.compile(r"<analysis>(.*?)</analysis>", re.DOTALL)
_SCORE_RE = re.compile(r"<score>(.*?)</score>", re.DOTALL)


class UniGenBenchError(ValueError):
    """The UniGenBench folder cannot be used; the message names the config field and the fix."""


def prompts_csv(root: str | Path, set_name: str) -> Path:
    return Path(root) / "data" / f"test_prompts_{set_name}.csv"


def _literal(node: ast.AST, names: dict[str, Any]) -> Any:
    """A literal expression, where a bare name may stand for an earlier literal constant."""
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ValueError(f"name {node.id!r} is not a literal constant")
        return names[node.id]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("dict unpacking is not a literal")
        return {_literal(k, names): _literal(v, names) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def read_literal_constants(path: str | Path) -> dict[str, Any]:
    """Module-level ``NAME = <literal>`` assignments of a Python file, without running it.

    A dict may refer to earlier constants by name (``{"template": TEMPLATE_EN}``);
    assignments of anything else (calls, comprehensions, ...) are ignored.
    """
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    names: dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                names[stmt.targets[0].id] = _literal(stmt.value, names)
            except ValueError:
                continue
    return names


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The language-specific constants of ``eval_common.py`` (see ``LANG_CONFIGS`` there)."""

    lang: str
    template: str
    definitions: dict[str, str]
    prompt_column: str
    subdim_column: str
    testpoint_key: str
    desc_key: str
    definition_header: str
    description_header: str


def load_protocol(root: str | Path, lang: str) -> Protocol:
    """The judge template, definitions and column names for ``lang`` ("en" | "zh")."""
    path = Path(root) / COMMON_FILE
    if not path.is_file():
        raise UniGenBenchError(
            f"config.eval.unigenbench_dir={str(root)!r}: {path} is missing; point it at a clone of "
            "https://github.com/CodeGoat24/UniGenBench (the folder that holds data/ and eval/)")
    configs = read_literal_constants(path).get("LANG_CONFIGS")
    cfg = configs.get(lang) if isinstance(configs, dict) else None
    missing = [f for f in LANG_FIELDS if not isinstance(cfg, dict) or f not in cfg]
    if missing:
        raise UniGenBenchError(
            f"config.eval.unigenbench_dir={str(root)!r}: {path} has no literal LANG_CONFIGS[{lang!r}] "
            f"with {missing}; this release of UniGenBench is not one this code reads (it was written "
            "against CodeGoat24/UniGenBench 49d0bce)")
    template = cfg["system_prompt_template"]
    definitions = cfg["explanation_dict"]
    if not isinstance(template, str) or not isinstance(definitions, dict):
        raise UniGenBenchError(f"{path}: LANG_CONFIGS[{lang!r}] template / definitions are not a string / dict")
    return Protocol(lang, template, dict(definitions), cfg["prompt_column"], cfg["subdim_column"],
                    cfg["testpoint_key"], cfg["desc_key"], cfg["checkpoint_header"],
                    cfg["checkpoint_desc_header"])


@dataclasses.dataclass(frozen=True)
class Item:
    """One test prompt: its ``index``, text, testpoints ``[K]`` and their descriptions ``[K]``."""

    index: int
    prompt: str
    testpoints: tuple[str, ...]
    descriptions: tuple[str, ...]


def load_set(root: str | Path, set_name: str, limit: int = 0
             ) -> tuple[Protocol, list[Item], list[dict[str, Any]]]:
    """(protocol, items, data issues) of ``data/test_prompts_{set_name}.csv``.

    ``limit`` > 0 keeps the first ``limit`` usable prompts. Each data issue is
    ``{"file", "row", "index", "problem", "handling"}`` (``row`` counts data
    rows from 0) and is also logged as a warning.
    """
    if set_name not in SETS:
        raise UniGenBenchError(f"config.eval.unigenbench_set={set_name!r}: must be one of {SETS}")
    protocol = load_protocol(root, set_name.split("_")[0])
    path = prompts_csv(root, set_name)
    if not path.is_file():
        raise UniGenBenchError(
            f"config.eval.unigenbench_dir={str(root)!r}: {path} is missing (the release has "
            f"data/test_prompts_{{{','.join(SETS)}}}.csv; pick one with config.eval.unigenbench_set)")
    issues: list[dict[str, Any]] = []
    items: list[Item] = []

    def issue(row: int, index: Any, problem: str, handling: str) -> None:
        issues.append({"file": str(path), "row": row, "index": index, "problem": problem, "handling": handling})
        log.warning("%s row %d (index %s): %s; %s", path, row, index, problem, handling)

    skip = "the prompt is left out of the eval"
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = ("index", protocol.prompt_column, protocol.subdim_column)
        if reader.fieldnames is None or any(c not in reader.fieldnames for c in columns):
            raise UniGenBenchError(f"{path}: needs the columns {columns}, has {reader.fieldnames}")
        for row, rec in enumerate(reader):
            raw_index, prompt = rec["index"], (rec[protocol.prompt_column] or "").strip()
            try:
                index = int(str(raw_index).strip())
            except ValueError:
                issue(row, raw_index, f"index {raw_index!r} is not an integer", skip)
                continue
            if not prompt:
                issue(row, index, f"empty {protocol.prompt_column}", skip)
                continue
            try:
                sub_dims = json.loads(rec[protocol.subdim_column] or "")
            except json.JSONDecodeError as err:
                issue(row, index, f"{protocol.subdim_column} is not valid JSON ({err})", skip)
                continue
            points = sub_dims.get(protocol.testpoint_key) if isinstance(sub_dims, dict) else None
            if not isinstance(points, list) or not points or not all(isinstance(p, str) and p for p in points):
                issue(row, index, f"{protocol.subdim_column} has no non-empty list of testpoint names "
                      f"under {protocol.testpoint_key!r}", skip)
                continue
            descriptions = sub_dims.get(protocol.desc_key)
            if not isinstance(descriptions, list):
                descriptions = []
            descriptions = ["" if d is None else str(d) for d in descriptions]
            if len(descriptions) < len(points):
                issue(row, index, f"{len(points)} testpoints but {len(descriptions)} descriptions",
                      "the missing descriptions are empty")
                descriptions += [""] * (len(points) - len(descriptions))
            elif len(descriptions) > len(points):
                issue(row, index, f"{len(points)} testpoints but {len(descriptions)} descriptions",
                      "the extra descriptions are ignored")
                descriptions = descriptions[:len(points)]
            for point, desc in zip(points, descriptions):
                if not desc.strip():
                    issue(row, index, f"empty description for testpoint {point!r}",
                          "kept; the judge sees the testpoint with an empty description (as the official code)")
            for point in points:
                if point not in protocol.definitions:
                    issue(row, index, f"testpoint {point!r} has no definition in {COMMON_FILE}",
                          "kept with an empty definition")
            items.append(Item(index, prompt, tuple(points), tuple(descriptions)))
            if limit and len(items) >= limit:
                break
    if not items:
        raise UniGenBenchError(f"{path}: no usable prompt (see the warnings above)")
    return protocol, items, issues


def request_text(protocol: Protocol, item: Item) -> str:
    """The judge prompt of ``item``, assembled as ``eval_common.build_system_prompt`` does."""
    definitions = f"{protocol.definition_header}:\u300c" + "".join(
        f"\n{p}: {protocol.definitions.get(p, '')}" for p in item.testpoints) + "\n\u300d"
    descriptions = f"{protocol.description_header}:\u300c" + "".join(
        f"\n{p}: {d}" for p, d in zip(item.testpoints, item.descriptions)) + "\n\u300d"
    # The template formats the testpoint list with str(), i.e. as a Python list literal.
    return protocol.template.format(prompt=item.prompt, testpoint=list(item.testpoints),
                                    explanation=definitions, test_explanation=descriptions)


def parse_reply(text: Optional[str], num_testpoints: int) -> Optional[tuple[list, list]]:
    """(analysis ``[K]``, scores ``[K]``) from a judge reply, or None when it does not parse.

    The official rule: both ``<analysis>`` and ``<score>`` hold Python list
    literals of exactly ``num_testpoints`` elements.
    """
    if not isinstance(text, str):
        return None
    analysis, score = _ANALYSIS_RE.search(text), _SCORE_RE.search(text)
    if analysis is None or score is None:
        return None
    try:
        analysis_list = ast.literal_eval(analysis.group(1).strip())
        score_list = ast.literal_eval(score.group(1).strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(analysis_list, (list, tuple)) or not isinstance(score_list, (list, tuple)):
        return None
    if len(analysis_list) != num_testpoints or len(score_list) != num_testpoints:
        return None
    return list(analysis_list), list(score_list)


def read_image(path: str | Path) -> np.ndarray:
    """An image file as ``[H, W, 3]`` float32 in [0, 1] (PNG round trip is exact)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), np.float32) / 255.0


def judge_image(judge, protocol: Protocol, item: Item, image: np.ndarray | Path, img_path: str,
                max_retries: int) -> dict[str, Any]:
    """One image's result row (the official result layout) plus ``attempts``.

    Args:
      judge: a :class:`~prefgrpo_jax.rewards.judge.VLMJudge`.
      image: ``[H, W, 3]`` in [0, 1], or the path of an image file (read
        here, so that queued jobs hold no pixels); sent as JPEG q95, like the
        official client.
      max_retries: further requests after a reply that does not parse.

    ``result_json`` is None when no reply parsed (the image is skipped).
    """
    from prefgrpo_jax.rewards.judge import encode_image_data_url

    if isinstance(image, Path):
        image = read_image(image)
    text = request_text(protocol, item)
    url = encode_image_data_url(image, "jpeg", 95)
    reply, result = None, None
    attempts = 0
    for attempts in range(1, max_retries + 2):
        answer, _ = judge.complete(text, (url,), where=f"UniGenBench {img_path}")
        reply = answer if answer is not None else reply
        parsed = parse_reply(answer, len(item.testpoints))
        if parsed is not None:
            result = {"prompt": item.prompt, "testpoint": list(item.testpoints),
                      "analysis": parsed[0], "score": parsed[1]}
            break
    if result is None:
        tail = " ".join(str(reply).split())[-160:] if reply is not None else "no reply"
        log.warning("UniGenBench %s: no parseable reply in %d attempts, image skipped (last: ...%r)",
                    img_path, attempts, tail)
    return {"index": item.index, "prompt": item.prompt, "testpoint": list(item.testpoints),
            "output": reply, "result_json": result, "img_path": img_path, "attempts": attempts}


def judge_images(judge, protocol: Protocol, jobs: Iterable[tuple[Item, np.ndarray | Path, str]],
                 max_retries: int) -> list[dict[str, Any]]:
    """:func:`judge_image` over ``(item, image, img_path)`` jobs, ``judge.max_concurrency`` at a time.

    ``jobs`` may be a generator: each job is submitted as soon as it is yielded,
    so judging overlaps whatever produces the jobs (e.g. sampling the next batch).

    Raises:
      JudgeUnavailableError: no request got any reply.
    """
    from prefgrpo_jax.rewards.judge import JudgeUnavailableError

    with ThreadPoolExecutor(max_workers=judge.max_concurrency, thread_name_prefix="unigenbench") as pool:
        results = list(pool.map(lambda job: judge_image(judge, protocol, *job, max_retries=max_retries), jobs))
    # An unreachable judge must fail the eval, not turn into a table of skipped images.
    if results and all(r["output"] is None for r in results):
        raise JudgeUnavailableError(
            f"no UniGenBench judge request to {judge.url} got a reply (model {judge.model!r}); "
            "check config.eval.vlm_judge.base_url / model with python -m prefgrpo_jax.judge_check")
    return results


def primary_dimension(testpoint: str) -> str:
    """``"Attribute - Quantity"`` -> ``"Attribute"``; a name without "-" is its own primary."""
    return testpoint.split("-", 1)[0].strip() if "-" in testpoint else testpoint


def score_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Official scoring of result rows (``testpoint`` list, ``result_json`` dict or None).

    Returns ``{"primary_dimensions": {name: {correct, total, accuracy}},
    "sub_dimensions": {...}, "overall", "images_judged", "images_skipped"}``;
    accuracies are fractions (rounded to 4 places like the official JSON;
    ``overall`` is the mean of the unrounded primary accuracies).
    """
    primary: dict[str, list[int]] = {}
    sub: dict[str, list[int]] = {}
    judged = skipped = 0
    for row in results:
        result = row["result_json"]
        if result is None:
            skipped += 1
            continue
        judged += 1
        for point, score in zip(row["testpoint"], result["score"]):
            for table, name in ((primary, primary_dimension(point)), (sub, point)):
                counts = table.setdefault(name, [0, 0])
                counts[0] += int(score == 1)
                counts[1] += 1

    def table(counts: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
        return {name: {"correct": c, "total": t, "accuracy": round(c / t, 4)}
                for name, (c, t) in sorted(counts.items())}

    overall = float(np.mean([c / t for c, t in primary.values()])) if primary else float("nan")
    return {"primary_dimensions": table(primary), "sub_dimensions": table(sub), "overall": overall,
            "images_judged": judged, "images_skipped": skipped}


def score_table(summary: dict[str, Any]) -> dict[str, float]:
    """``{primary dimension: accuracy, ..., "overall": mean}`` from :func:`score_results`."""
    table = {name: v["accuracy"] for name, v in summary["primary_dimensions"].items()}
    table["overall"] = summary["overall"]
    return table


def write_results_csv(path: str | Path, results: Sequence[dict[str, Any]]) -> Path:
    """The official result CSV (``eval_common.run_evaluation``'s columns and cell formats).

    UniGenBench's ``calculate_score.py --result_csv PATH`` re-scores it; a
    skipped image has ``result_json`` ``null`` there, which that script skips too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(RESULT_COLUMNS)
        for r in results:
            writer.writerow([str(int(r["index"])), r["prompt"], str(list(r["testpoint"])),
                             "" if r["output"] is None else r["output"],
                             json.dumps(r["result_json"], ensure_ascii=False, indent=4), r["img_path"]])
    return path


def summary_markdown(summary: dict[str, Any], title: str) -> str:
    """Primary-dimension table (+ overall), then the sub-dimension table, in percent."""
    prim = summary["primary_dimensions"]
    lines = [
        f"UniGenBench {title}: {summary['images_judged']} images judged, "
        f"{summary['images_skipped']} skipped (no parseable reply)",
        "",
        "| model | " + " | ".join(prim) + " | overall |",
        "|" + "---|" * (len(prim) + 2),
        f"| {title} | " + " | ".join(f"{100 * v['accuracy']:.2f}" for v in prim.values())
        + f" | {100 * summary['overall']:.2f} |",
        "",
        "| sub-dimension | correct | total | accuracy |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {v['correct']} | {v['total']} | {100 * v['accuracy']:.2f} |"
              for name, v in summary["sub_dimensions"].items()]
    return "\n".join(lines)
