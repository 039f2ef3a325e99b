"""Prompt and preference-pair data as TFDS datasets (array_record, no TensorFlow).

Two local file formats become TFDS datasets written in the array_record format:

* **Prompts** (training / evaluation prompts): a ``.txt`` file with one prompt
  per line (blank lines skipped), or a ``.jsonl`` file whose lines are objects
  with a required ``"prompt"`` string and optional ``"category"`` (string) and
  ``"id"`` (string or integer). Features: ``prompt``, ``category``, ``id``
  (``""`` when absent) and ``index`` (0-based position in the file).
* **Preference pairs** (for the pairwise reward model): a ``.jsonl`` file whose
  lines are ``{"prompt": ..., "image_a": "rel/a.png", "image_b": "rel/b.png",
  "label": 1.0}`` plus a folder of images. ``label`` is the probability that
  image a is preferred (1 = a wins, 0 = b wins, 0.5 = tie; any value in [0, 1]
  is accepted as a soft label). Features: ``prompt``, ``image_a``, ``image_b``
  (uint8 ``[H, W, 3]``), ``label`` (float32), ``index``.

How this runs without TensorFlow
--------------------------------
TFDS writes examples with its own protobuf serializer (no TF op involved) and
the array_record writer, as long as no feature needs a TF op to *encode*: text
and scalars never do, and images are handed to TFDS as PIL images / PNG bytes
(encoding a NumPy array would call ``tf.image.encode_png``). Reading goes
through ``builder.as_data_source(split)``, an ``ArrayRecordDataSource``: a
random-access ``Sequence`` that deserialises each record with
``features.deserialize_example_np`` (NumPy/PIL only). Nothing here imports
TensorFlow; ``tests/test_data.py`` checks it with ``tensorflow`` blocked.

Caching
-------
Prepared data lives under ``data_dir/<dataset name>/<config>/<version>`` where
the config name embeds a SHA-256 of the input (the file bytes; for pairs also
every referenced image's path and bytes) and of this module's parser version.
A changed input is therefore prepared again into a new directory, an unchanged
one is reused. TFDS prepares into a temporary directory and renames it, so a
reader never sees half a data set; processes that prepare the same content
at the same time all succeed (the losers of the final rename reuse the
winner's identical data), but to avoid the duplicated work let process 0
prepare (``prepare=True``) and the others load with ``prepare=False`` after a
barrier.

Iteration for training
----------------------
:class:`PromptStream` turns a random-access source into a deterministic,
per-process sharded stream of prompt batches; ``batch_at(step)`` is a pure
function of ``(seed, step, process_index, process_count, batch_size)``, and
``state()`` / ``restore()`` carry the position through a checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

__all__ = [
    "PromptRecord",
    "PairRecord",
    "parse_prompt_file",
    "parse_preference_pairs",
    "PromptFileConfig",
    "PromptFileBuilder",
    "PreferencePairsConfig",
    "PreferencePairsBuilder",
    "prompt_builder",
    "preference_pairs_builder",
    "load_prompts",
    "load_preference_pairs",
    "DecodedSource",
    "PromptBatch",
    "PromptStream",
]

# Bump when parsing or the feature layout changes: it is part of the cache key,
# so data prepared by an older parser is never silently reused.
_PARSER_VERSION = "1"
_SPLIT = "train"
_PROMPT_SUFFIXES = (".txt", ".jsonl")


# --------------------------------------------------------------------------- #
# Parsing (pure Python; every error names the file, the line and the fix)
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt parsed from a local file."""

    prompt: str
    category: str
    id: str
    index: int  # 0-based position among the file's prompts
    line: int  # 1-based line number in the file, for error messages


@dataclasses.dataclass(frozen=True)
class PairRecord:
    """One preference pair parsed from a JSONL file (paths not yet opened)."""

    prompt: str
    image_a: str  # relative to the image root, as written in the file
    image_b: str
    label: float
    index: int
    line: int


def _read_lines(path: Path) -> list[str]:
    """Reads a UTF-8 text file (BOM tolerated) as lines, with clear errors."""
    if not path.exists():
        raise FileNotFoundError(
            f"Data file {str(path)!r} does not exist. Check the path (relative "
            f"paths resolve against the current directory {os.getcwd()!r})."
        )
    if not path.is_file():
        raise ValueError(f"Data file {str(path)!r} is not a regular file.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not valid UTF-8 ({e.reason}). Re-save the file as UTF-8."
        ) from None
    # Split on "\n" only: str.splitlines() also breaks on U+2028, form feeds
    # etc., which may legitimately occur inside a prompt (and would shift the
    # line numbers in error messages).
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _load_json_line(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}). Each "
            "line of a .jsonl file must be one complete JSON object."
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}. "
            'Each line must look like {"prompt": "..."}.'
        )
    return obj


def _required_str(path: Path, lineno: int, obj: Mapping[str, Any], key: str, example: str) -> str:
    if key not in obj:
        raise ValueError(
            f"{path}:{lineno}: missing required key {key!r} (keys present: "
            f"{sorted(obj)}). Add it, e.g. {example}."
        )
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"{path}:{lineno}: {key!r} must be a non-empty string, got {value!r}."
        )
    return value


def _check_prompt_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _PROMPT_SUFFIXES:
        raise ValueError(
            f"Prompt file {str(path)!r} has suffix {suffix!r}; expected one of "
            f"{_PROMPT_SUFFIXES} (.txt: one prompt per line; .jsonl: one "
            '{"prompt": ..., "category": ...} object per line).'
        )
    return suffix


def parse_prompt_file(path: str | os.PathLike[str]) -> list[PromptRecord]:
    """Parses a ``.txt`` or ``.jsonl`` prompt file.

    ``.txt``: one prompt per line; surrounding whitespace is stripped and blank
    lines are skipped. ``.jsonl``: one JSON object per non-blank line with a
    required non-empty ``"prompt"`` string (kept verbatim), optional
    ``"category"`` (string or null) and optional ``"id"`` (string or integer);
    other keys are ignored.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: unknown suffix, no prompts, or a bad line (named by number).
    """
    path = Path(path)
    suffix = _check_prompt_suffix(path)
    records: list[PromptRecord] = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        if suffix == ".txt":
            records.append(PromptRecord(line.strip(), "", "", len(records), lineno))
            continue
        obj = _load_json_line(path, lineno, line)
        prompt = _required_str(path, lineno, obj, "prompt", '{"prompt": "a red cube"}')
        category = obj.get("category")
        if category is None:
            category = ""
        elif not isinstance(category, str):
            raise ValueError(
                f"{path}:{lineno}: 'category' must be a string, got {category!r}."
            )
        raw_id = obj.get("id")
        if raw_id is None:
            id_ = ""
        elif isinstance(raw_id, str) or (isinstance(raw_id, int) and not isinstance(raw_id, bool)):
            id_ = str(raw_id)
        else:
            raise ValueError(
                f"{path}:{lineno}: 'id' must be a string or an integer, got {raw_id!r}."
            )
        records.append(PromptRecord(prompt, category, id_, len(records), lineno))
    if not records:
        raise ValueError(
            f"Prompt file {str(path)!r} contains no prompts (it is empty or only "
            "blank lines). Add at least one prompt."
        )
    return records


def _check_label(path: Path, lineno: int, obj: Mapping[str, Any]) -> float:
    if "label" not in obj:
        raise ValueError(
            f"{path}:{lineno}: missing required key 'label'. Add the probability "
            "that image_a is preferred: 1 (a wins), 0 (b wins) or 0.5 (tie)."
        )
    label = obj["label"]
    # bool is an int subclass; "true" as a label is more likely a bug than 1.0.
    if isinstance(label, bool) or not isinstance(label, (int, float)):
        raise ValueError(
            f"{path}:{lineno}: 'label' must be a number in [0, 1] (1: image_a "
            f"preferred, 0: image_b preferred, 0.5: tie), got {label!r}."
        )
    if not (math.isfinite(label) and 0.0 <= label <= 1.0):
        raise ValueError(
            f"{path}:{lineno}: 'label' must lie in [0, 1] (1: image_a preferred, "
            f"0: image_b preferred, 0.5: tie), got {label!r}."
        )
    return float(label)


def parse_preference_pairs(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None
) -> list[PairRecord]:
    """Parses a preference-pair ``.jsonl`` file and checks the images exist.

    Args:
      path: JSONL file, one ``{"prompt", "image_a", "image_b", "label"}`` object
        per non-blank line.
      image_root: folder the image paths are relative to; defaults to the
        JSONL file's folder.

    Raises:
      FileNotFoundError: the JSONL file or the image root does not exist.
      ValueError: a bad line (named by number): invalid JSON, a missing field,
        a label outside [0, 1], an absolute image path or a missing image file.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    lines = _read_lines(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Image root {str(root)!r} is not a directory. Pass image_root= the "
            "folder the image paths in the JSONL are relative to."
        )
    records: list[PairRecord] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        obj = _load_json_line(path, lineno, line)
        prompt = _required_str(path, lineno, obj, "prompt", '{"prompt": "a red cube", ...}')
        images = []
        for key in ("image_a", "image_b"):
            rel = _required_str(path, lineno, obj, key, f'"{key}": "images/0001_a.png"')
            if os.path.isabs(rel):
                raise ValueError(
                    f"{path}:{lineno}: {key} {rel!r} is an absolute path; write it "
                    f"relative to the image root {str(root)!r} so the data set "
                    "stays movable."
                )
            if not (root / rel).is_file():
                raise ValueError(
                    f"{path}:{lineno}: {key} file {str(root / rel)!r} does not exist. "
                    "Fix the path (relative to the image root) or pass the right "
                    "image_root=."
                )
            images.append(rel)
        label = _check_label(path, lineno, obj)
        records.append(PairRecord(prompt, images[0], images[1], label, len(records), lineno))
    if not records:
        raise ValueError(
            f"Preference file {str(path)!r} contains no pairs (it is empty or only "
            "blank lines)."
        )
    return records


def _open_rgb(path: Path, where: str):
    """Returns a PIL RGB image (or the raw bytes of an RGB PNG, kept verbatim)."""
    from PIL import Image, UnidentifiedImageError  # PIL is a TFDS dependency here.

    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.format == "PNG" and img.mode == "RGB":
                return data  # already what we store: no re-encode
            # RGBA / grey / palette / JPEG ...: normalise to 3 channels, which
            # TFDS then stores as a (lossless) PNG encoded by PIL, not TF.
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: cannot decode image {str(path)!r}: {e}") from None


# --------------------------------------------------------------------------- #
# Cache keys
# --------------------------------------------------------------------------- #


def _sha256_file(h: "hashlib._Hash", path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def _config_name(stem: str, digest: str) -> str:
    # Human-readable prefix + content hash; TFDS uses it as a directory name.
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_")[:40] or "data"
    return f"{stem}_{digest[:16]}"


def _prompt_file_key(path: Path) -> str:
    h = hashlib.sha256(f"prompts/{_PARSER_VERSION}/{path.suffix.lower()}\0".encode())
    _sha256_file(h, path)
    return h.hexdigest()


def _pairs_key(path: Path, root: Path, records: Sequence[PairRecord]) -> str:
    # Images are part of the content: replacing a PNG must re-prepare. Each is
    # hashed once even if referenced by many pairs.
    h = hashlib.sha256(f"pairs/{_PARSER_VERSION}\0".encode())
    _sha256_file(h, path)
    for rel in sorted({r.image_a for r in records} | {r.image_b for r in records}):
        h.update(b"\0" + rel.encode() + b"\0")
        _sha256_file(h, root / rel)
    return h.hexdigest()


# --------------------------------------------------------------------------- #
# TFDS builders
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class PromptFileConfig(tfds.core.BuilderConfig):
    """Config of :class:`PromptFileBuilder`: which local file to read.

    The name must embed the file's content hash (see :func:`prompt_builder`),
    which is what makes a changed file land in a new cache directory.
    """

    path: str = ""


class PromptFileBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder over a local ``.txt`` / ``.jsonl`` prompt file.

    Use :func:`prompt_builder` to construct it (it derives the config name from
    the content hash); one split, ``"train"``, in file order.
    """

    # skip_registration: the class is built per file at runtime and must not
    # collide with (or pollute) the global TFDS registry.
    name = "prefgrpo_prompts"
    # TFDS 4.9.10 computes `code_path` (to look for a checksums.tsv of URLs)
    # through `importlib_resources`, a backport it only declares for Python <
    # 3.9, so the lookup fails for builders defined in a package. We download
    # nothing, so there are no checksums: opt out of the lookup.
    code_path = None
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "prompt, category, id, index."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Prompts from a local .txt or .jsonl file.",
            features=tfds.features.FeaturesDict(
                {
                    "prompt": tfds.features.Text(),
                    "category": tfds.features.Text(),
                    "id": tfds.features.Text(),
                    "index": np.int64,
                }
            ),
            # Keep file order: record i is prompt i (shuffling is the stream's
            # job, per epoch, not a one-off at write time).
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local file, nothing to download
        # Parse everything before writing anything, so a bad line fails fast.
        records = parse_prompt_file(self.builder_config.path)
        return {_SPLIT: self._generate_examples(records)}

    def _generate_examples(self, records: Sequence[PromptRecord]):
        for r in records:
            yield r.index, {"prompt": r.prompt, "category": r.category, "id": r.id, "index": r.index}


@dataclasses.dataclass
class PreferencePairsConfig(tfds.core.BuilderConfig):
    """Config of :class:`PreferencePairsBuilder`: the JSONL file and image root."""

    path: str = ""
    image_root: str = ""


class PreferencePairsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder over a local preference-pair JSONL file + image folder.

    Use :func:`preference_pairs_builder` to construct it. One split,
    ``"train"``, in file order.
    """

    name = "prefgrpo_preference_pairs"
    code_path = None  # see PromptFileBuilder.code_path
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "prompt, image_a, image_b, label, index."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Pairwise image preferences: P(image_a preferred) = label.",
            features=tfds.features.FeaturesDict(
                {
                    "prompt": tfds.features.Text(),
                    "image_a": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "image_b": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "label": np.float32,
                    "index": np.int64,
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        records = parse_preference_pairs(cfg.path, cfg.image_root)
        return {_SPLIT: self._generate_examples(records)}

    def _generate_examples(self, records: Sequence[PairRecord]):
        cfg = self.builder_config
        root = Path(cfg.image_root)
        for r in records:
            where = f"{cfg.path}:{r.line}"
            yield r.index, {
                "prompt": r.prompt,
                "image_a": _open_rgb(root / r.image_a, where),
                "image_b": _open_rgb(root / r.image_b, where),
                "label": np.float32(r.label),
                "index": r.index,
            }


_ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD


class _DropCustomConfigWarning(logging.Filter):
    """Drops TFDS' "Using custom data configuration" warning.

    Every builder here is built from a per-file custom config by design, so the
    warning would fire on every load and says nothing useful.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")


def _make_builder(cls: type, config: tfds.core.BuilderConfig, data_dir: str | os.PathLike[str]):
    logger = logging.getLogger("absl")
    quiet = _DropCustomConfigWarning()
    logger.addFilter(quiet)
    try:
        return cls(config=config, data_dir=os.fspath(data_dir), file_format=_ARRAY_RECORD)
    finally:
        logger.removeFilter(quiet)


def prompt_builder(path: str | os.PathLike[str], data_dir: str | os.PathLike[str]) -> PromptFileBuilder:
    """Returns the (not necessarily prepared) TFDS builder for a prompt file.

    The builder's config name is ``<file stem>_<sha256 prefix>``, so
    ``data_dir`` can hold many prompt files and versions of them side by side.
    """
    path = Path(path).absolute()
    _check_prompt_suffix(path)
    if not path.is_file():
        _read_lines(path)  # raises the descriptive FileNotFoundError / ValueError
    config = PromptFileConfig(
        name=_config_name(path.stem, _prompt_file_key(path)),
        version=PromptFileBuilder.VERSION,
        description=f"Prompts from {path}",
        path=str(path),
    )
    return _make_builder(PromptFileBuilder, config, data_dir)


def preference_pairs_builder(
    path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
) -> PreferencePairsBuilder:
    """Returns the TFDS builder for a preference-pair JSONL + image folder.

    Parses and validates the JSONL (errors name the line) and hashes it together
    with every referenced image, so editing either re-prepares the data.
    """
    path = Path(path).absolute()
    root = (Path(image_root) if image_root is not None else path.parent).absolute()
    records = parse_preference_pairs(path, root)
    config = PreferencePairsConfig(
        name=_config_name(path.stem, _pairs_key(path, root, records)),
        version=PreferencePairsBuilder.VERSION,
        description=f"Preference pairs from {path} (images under {root})",
        path=str(path),
        image_root=str(root),
    )
    return _make_builder(PreferencePairsBuilder, config, data_dir)


class DecodedSource(Sequence):
    """Random-access view of a TFDS data source with text features as ``str``.

    TFDS' NumPy decoding returns ``Text`` features as UTF-8 ``bytes``; this
    wrapper decodes them and turns NumPy scalars into Python numbers, so
    records are plain dicts (``{"prompt": str, ..., "index": int}``).
    Supports ``len``, ``src[i]``, ``src[a:b]`` and ``src.__getitems__(idx)``
    (one batched array_record read).
    """

    def __init__(self, data_source: Sequence[Mapping[str, Any]], builder: tfds.core.DatasetBuilder):
        self.data_source = data_source
        self.builder = builder

    @staticmethod
    def _decode(record: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in record.items():
            if isinstance(v, bytes):
                v = v.decode("utf-8")
            elif isinstance(v, np.generic):
                v = v.item()
            out[k] = v
        return out

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, slice):
            return self.__getitems__(range(*key.indices(len(self))))
        n = len(self)
        i = int(key)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} records")
        return self._decode(self.data_source[i % n])

    def __getitems__(self, keys: Sequence[int]) -> list[dict[str, Any]]:
        keys = [int(k) for k in keys]
        if not keys:
            return []
        return [self._decode(r) for r in self.data_source.__getitems__(keys)]

    def __repr__(self) -> str:
        cfg = self.builder.builder_config
        return f"DecodedSource({self.builder.name}/{cfg.name}, {len(self)} records)"


def _prepared_source(
    builder: tfds.core.DatasetBuilder, prepare: bool, validate: Callable[[], Any] | None = None
) -> DecodedSource:
    if not builder.is_prepared():
        if not prepare:
            raise FileNotFoundError(
                f"Dataset {builder.name}/{builder.builder_config.name} is not prepared "
                f"under {builder.data_dir!r}. Prepare it first (call with "
                "prepare=True, e.g. on process 0 before a barrier)."
            )
        if validate is not None:
            validate()  # fail on a bad line before TFDS creates any directory
        # Prompt files prepare in a second; TFDS' nested tqdm bars would only
        # interleave with the training progress line.
        tfds.disable_progress_bar()
        try:
            builder.download_and_prepare(file_format=_ARRAY_RECORD)
        except FileExistsError:
            # Another process prepared the same content concurrently and won
            # the final rename of TFDS' temporary directory: its data is
            # identical (same content hash), so use it.
            builder = _make_builder(type(builder), builder.builder_config, builder.data_dir_root)
            if not builder.is_prepared():
                raise
    return DecodedSource(builder.as_data_source(split=_SPLIT), builder)


def load_prompts(
    path: str | os.PathLike[str], data_dir: str | os.PathLike[str], *, prepare: bool = True
) -> DecodedSource:
    """Prepares (once per file content) and opens a prompt file, TF-free.

    Returns a random-access source of ``{"prompt": str, "category": str,
    "id": str, "index": int}`` records in file order; feed it to
    :class:`PromptStream`.
    """
    return _prepared_source(prompt_builder(path, data_dir), prepare, lambda: parse_prompt_file(path))


def load_preference_pairs(
    path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    prepare: bool = True,
) -> DecodedSource:
    """Prepares (once per content) and opens a preference-pair data set, TF-free.

    Returns a random-access source of ``{"prompt": str, "image_a": uint8
    [H,W,3], "image_b": uint8 [H,W,3], "label": float, "index": int}``.
    """
    return _prepared_source(preference_pairs_builder(path, data_dir, image_root), prepare)


# --------------------------------------------------------------------------- #
# Deterministic, sharded prompt stream
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """This process's share of one global batch of prompts."""

    prompts: list[str]
    categories: list[str]
    ids: list[str]
    indices: np.ndarray  # int64 [batch_size]: record index in the source
    epochs: np.ndarray  # int64 [batch_size]: epoch each prompt was drawn in


def _as_str(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else ("" if v is None else str(v))


class PromptStream:
    """Deterministic, per-process sharded, resumable stream of prompt batches.

    Every epoch is a permutation of the N records drawn from
    ``np.random.default_rng([seed, epoch])`` (identity when ``shuffle=False``).
    A *global batch* is ``batch_size * process_count`` consecutive entries of
    that sequence; process ``p`` takes entries ``p, p + P, p + 2P, ...`` of it
    (a strided slice), so the processes' shards are disjoint within an epoch
    and together cover it. Each process reads only its own records from the
    random-access source.

    Epoch boundaries (``drop_remainder``):

    * ``False`` (default): epochs are concatenated; nothing is skipped and
      every record is seen exactly once per epoch. A batch may straddle an
      epoch boundary (its ``epochs`` field says which epoch each prompt came
      from), so it can contain the same prompt twice; a data set smaller than
      the global batch simply wraps around several epochs per batch.
    * ``True``: each epoch yields ``N // global_batch`` full batches and the
      last ``N % global_batch`` entries of its permutation are dropped (they
      differ per epoch, so no record is permanently excluded). Needs
      ``N >= global_batch``.

    Position: ``state()`` returns ``{"epoch", "offset", "seed",
    "num_examples"}`` (plain ints, checkpoint-friendly) where ``offset`` is the
    number of entries of epoch ``epoch``'s permutation consumed so far (by all
    processes). ``restore(state)`` continues exactly where it stopped, even on
    a different process count as long as the global batch is unchanged.
    ``batch_at(step)`` is the pure form: the batch the ``step``-th ``next()``
    call of a fresh stream returns.
    """

    def __init__(
        self,
        source: Sequence[Mapping[str, Any]],
        batch_size: int,
        *,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        drop_remainder: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size (per process) must be >= 1, got {batch_size}.")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(
                f"need 0 <= process_index < process_count, got process_index="
                f"{process_index}, process_count={process_count}."
            )
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}.")
        self.source = source
        self.num_examples = len(source)
        if self.num_examples < 1:
            raise ValueError("PromptStream needs a source with at least one record.")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        self.global_batch_size = self.batch_size * self.process_count
        if self.drop_remainder and self.num_examples < self.global_batch_size:
            raise ValueError(
                f"drop_remainder=True needs at least one full global batch per epoch: "
                f"{self.num_examples} records < batch_size {self.batch_size} x "
                f"process_count {self.process_count} = {self.global_batch_size}. "
                "Use drop_remainder=False (epochs wrap) or a smaller batch."
            )
        self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._epoch = 0
        self._offset = 0

    # -- positions ---------------------------------------------------------- #

    @property
    def steps_per_epoch(self) -> float:
        """Global batches per epoch (an integer with ``drop_remainder``)."""
        if self.drop_remainder:
            return self.num_examples // self.global_batch_size
        return self.num_examples / self.global_batch_size

    def position_at(self, step: int) -> tuple[int, int]:
        """``(epoch, offset)`` at which global batch number ``step`` starts."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        if self.drop_remainder:
            epoch, k = divmod(step, self.num_examples // self.global_batch_size)
            return epoch, k * self.global_batch_size
        return divmod(step * self.global_batch_size, self.num_examples)

    def _next_position(self, epoch: int, offset: int) -> tuple[int, int]:
        if self.drop_remainder:
            offset += self.global_batch_size
            if offset + self.global_batch_size > self.num_examples:
                return epoch + 1, 0
            return epoch, offset
        return divmod(epoch * self.num_examples + offset + self.global_batch_size, self.num_examples)

    def _normalise(self, epoch: int, offset: int) -> tuple[int, int]:
        # A restored offset may not fit this stream's batching (e.g. saved with
        # another global batch size under drop_remainder): start the next epoch.
        if self.drop_remainder and offset + self.global_batch_size > self.num_examples:
            return epoch + 1, 0
        return epoch, offset

    # -- permutation -------------------------------------------------------- #

    def permutation(self, epoch: int) -> np.ndarray:
        """The record order of ``epoch`` (the same on every process)."""
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            else:
                perm = np.arange(self.num_examples)
            perm = perm.astype(np.int64)
            self._perms[epoch] = perm
            while len(self._perms) > 4:  # a batch touches at most a few epochs in practice
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(epoch)
        return perm

    def indices_at(self, epoch: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """``(record indices, epochs)`` this process takes from the batch at a position."""
        slots = self.process_index + self.process_count * np.arange(self.batch_size, dtype=np.int64)
        flat = epoch * self.num_examples + offset + slots  # position in concatenated epochs
        epochs, within = np.divmod(flat, self.num_examples)
        indices = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            indices[sel] = self.permutation(int(e))[within[sel]]
        return indices, epochs

    def _read(self, epoch: int, offset: int) -> PromptBatch:
        indices, epochs = self.indices_at(epoch, offset)
        getitems = getattr(self.source, "__getitems__", None)
        if getitems is not None:
            records = list(getitems([int(i) for i in indices]))
        else:
            records = [self.source[int(i)] for i in indices]
        return PromptBatch(
            prompts=[_as_str(r["prompt"]) for r in records],
            categories=[_as_str(r.get("category", "")) for r in records],
            ids=[_as_str(r.get("id", "")) for r in records],
            indices=indices,
            epochs=epochs,
        )

    # -- public iteration ---------------------------------------------------- #

    def batch_at(self, step: int) -> PromptBatch:
        """This process's batch number ``step`` (0-based); pure, no state change."""
        return self._read(*self.position_at(step))

    def __iter__(self) -> Iterator[PromptBatch]:
        return self

    def __next__(self) -> PromptBatch:
        batch = self._read(self._epoch, self._offset)
        self._epoch, self._offset = self._next_position(self._epoch, self._offset)
        return batch

    def state(self) -> dict[str, int]:
        """Position of the next batch, as a small dict of ints for a checkpoint."""
        return {
            "epoch": self._epoch,
            "offset": self._offset,
            "seed": self.seed,
            "num_examples": self.num_examples,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continues from a ``state()``; refuses a different seed or data size."""
        missing = {"epoch", "offset"} - set(state)
        if missing:
            raise ValueError(f"PromptStream state is missing {sorted(missing)}: {dict(state)}.")
        seed = int(state.get("seed", self.seed))
        if seed != self.seed:
            raise ValueError(
                f"PromptStream state was saved with seed {seed}, this stream uses "
                f"{self.seed}; resuming would change the prompt order. Use the same seed."
            )
        n = int(state.get("num_examples", self.num_examples))
        if n != self.num_examples:
            raise ValueError(
                f"PromptStream state was saved for {n} records, the source has "
                f"{self.num_examples}; the prompt file changed, so the saved position "
                "is meaningless. Restore with the original file or start a fresh stream."
            )
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < self.num_examples:
            raise ValueError(f"invalid PromptStream position epoch={epoch}, offset={offset}.")
        self._epoch, self._offset = self._normalise(epoch, offset)

    def seek(self, step: int) -> None:
        """Moves to the start of global batch ``step`` (what ``batch_at`` reads)."""
        self._epoch, self._offset = self.position_at(step)
