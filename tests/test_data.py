"""Tests for prefgrpo_jax.data: TFDS prompt / preference-pair builders and PromptStream."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prefgrpo_jax import data

REPO = Path(__file__).resolve().parents[1]

PROMPTS = [
    {"prompt": "a red cube on a blue sphere", "category": "relationship", "id": "p0"},
    {"prompt": "Ünïcödé: a café sign that says 'OUVERT'", "category": "text", "id": 7},
    {"prompt": "three cats", "category": "counting"},
    {"prompt": "a photo of a dog", "category": None},
    {"prompt": "  leading and trailing spaces kept in jsonl  "},
]


def _write_jsonl(path: Path, rows, blank_lines=False) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if blank_lines:
        lines = ["", *lines[:2], "   ", *lines[2:], ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prompt_source(tmp_path_factory):
    """A prepared 10-prompt TFDS source, shared by the stream tests."""
    root = tmp_path_factory.mktemp("stream")
    path = _write_jsonl(
        root / "ten.jsonl", [{"prompt": f"prompt {i}", "category": f"c{i % 3}"} for i in range(10)]
    )
    return data.load_prompts(path, root / "tfds")


# --------------------------------------------------------------------------- #
# Builders: round trips, array_record files, caching
# --------------------------------------------------------------------------- #


def test_txt_round_trip(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog  \r\n\t\nthe moon, at noon\n", encoding="utf-8")
    src = data.load_prompts(path, tmp_path / "tfds")
    assert len(src) == 3
    assert [r["prompt"] for r in src] == ["a cat", "a dog", "the moon, at noon"]
    assert [r["category"] for r in src] == ["", "", ""]
    assert [r["index"] for r in src] == [0, 1, 2]
    assert all(isinstance(r["prompt"], str) for r in src)


def test_txt_line_numbers_split_on_newline_only(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\u2028b\x0cc\nsecond\r\n", encoding="utf-8")
    records = data.parse_prompt_file(path)
    assert [(r.prompt, r.line) for r in records] == [("a\u2028b\x0cc", 1), ("second", 2)]


def test_jsonl_round_trip_keeps_order_categories_ids(tmp_path):
    path = _write_jsonl(tmp_path / "prompts.jsonl", PROMPTS, blank_lines=True)
    src = data.load_prompts(path, tmp_path / "tfds")
    records = list(src)
    assert [r["prompt"] for r in records] == [p["prompt"] for p in PROMPTS]
    assert [r["category"] for r in records] == ["relationship", "text", "counting", "", ""]
    assert [r["id"] for r in records] == ["p0", "7", "", "", ""]
    assert [r["index"] for r in records] == list(range(len(PROMPTS)))
    # Batched random access (one array_record read) agrees with item access.
    assert src.__getitems__([4, 1, 1]) == [records[4], records[1], records[1]]
    assert src[1:3] == records[1:3]
    assert src[-1] == records[-1]
    with pytest.raises(IndexError):
        src[len(PROMPTS)]


def test_array_record_files_written_and_cache_keyed_by_content(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    data_dir = tmp_path / "tfds"
    src = data.load_prompts(path, data_dir)
    files = sorted(data_dir.glob("**/*.array_record*"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    assert not list(data_dir.glob("**/*.tfrecord*"))
    assert src.builder.info.file_format == data.tfds.core.FileFormat.ARRAY_RECORD

    # Same file, same content -> same config dir, no re-prepare.
    mtime = files[0].stat().st_mtime_ns
    again = data.load_prompts(path, data_dir)
    assert again.builder.data_dir == src.builder.data_dir
    assert files[0].stat().st_mtime_ns == mtime
    assert data.prompt_builder(path, data_dir).is_prepared()

    # Changed content -> new config dir with the new prompts; old one untouched.
    _write_jsonl(path, PROMPTS[:2] + [{"prompt": "a brand new prompt"}])
    assert not data.prompt_builder(path, data_dir).is_prepared()
    changed = data.load_prompts(path, data_dir)
    assert changed.builder.data_dir != src.builder.data_dir
    assert [r["prompt"] for r in changed][-1] == "a brand new prompt"
    assert len(list(data_dir.glob("**/*.array_record*"))) == 2


def test_prepare_false_refuses_unprepared_then_reads_prepared(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    with pytest.raises(FileNotFoundError, match="not prepared.*prepare=True"):
        data.load_prompts(path, tmp_path / "tfds", prepare=False)
    data.load_prompts(path, tmp_path / "tfds")  # "process 0" prepares
    src = data.load_prompts(path, tmp_path / "tfds", prepare=False)
    assert len(src) == len(PROMPTS)


_TF_FREE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path


    import importlib.machinery

    class _HideTensorFlow(importlib.machinery.PathFinder):
        # Makes an installed TensorFlow look absent: find_spec answers None
        # (what probes like etils' `find_spec("tensorflow")` see when it is not
        # installed) and `import tensorflow` raises ModuleNotFoundError. (Not
        # `sys.modules["tensorflow"] = None`: TFDS takes any key in sys.modules
        # as "TF already loaded" and then tries to use it.)
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                return None
            return super().find_spec(name, path, target)

    sys.meta_path[:] = [
        _HideTensorFlow if f is importlib.machinery.PathFinder else f for f in sys.meta_path
    ]
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("tensorflow could be imported although it was blocked")

    import numpy as np
    from PIL import Image
    from prefgrpo_jax import data

    tmp = Path(sys.argv[1])
    (tmp / "p.jsonl").write_text(
        "\\n".join(json.dumps({"prompt": f"p{i}", "category": "c"}) for i in range(5)))
    src = data.load_prompts(tmp / "p.jsonl", tmp / "tfds")
    assert [r["prompt"] for r in src] == [f"p{i}" for i in range(5)]
    batch = next(data.PromptStream(src, 2, seed=0))
    assert len(batch.prompts) == 2

    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    Image.fromarray(img).save(tmp / "a.png")
    Image.fromarray(255 - img).save(tmp / "b.png")
    (tmp / "pairs.jsonl").write_text(json.dumps(
        {"prompt": "x", "image_a": "a.png", "image_b": "b.png", "label": 1.0}))
    pairs = data.load_preference_pairs(tmp / "pairs.jsonl", tmp / "tfds")
    np.testing.assert_array_equal(pairs[0]["image_a"], img)
    np.testing.assert_array_equal(pairs[0]["image_b"], 255 - img)
    assert list(tmp.glob("tfds/**/*.array_record*"))
    assert "tensorflow" not in sys.modules, "something imported tensorflow"
    print("TF_FREE_OK")
    """
)


def test_everything_works_with_tensorflow_blocked(tmp_path):
    """TensorFlow is blocked in a fresh interpreter; prepare + read still work."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _TF_FREE_SCRIPT, str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TF_FREE_OK" in proc.stdout


def test_tensorflow_not_installed_and_not_imported(prompt_source):
    # The project's environment has no TensorFlow at all (the product card
    # promises tensorflow-datasets without it), and reading did not pull it in.
    # Where TF does happen to be installed, the subprocess test above still
    # proves the TF-free path.
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed in this environment")
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401
    assert prompt_source[0]["prompt"] == "prompt 0"
    assert "tensorflow" not in sys.modules


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_prompts(tmp_path / "nope.txt", tmp_path / "tfds")


@pytest.mark.parametrize("content", ["", "\n \n\t\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match="contains no prompts"):
        data.load_prompts(path, tmp_path / "tfds")
    # Validation happens before TFDS creates anything for the bad file.
    assert not list((tmp_path / "tfds").glob("**/*.array_record*"))


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n\n{"prompt": "broken"\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:3: invalid JSON"):
        data.load_prompts(path, tmp_path / "tfds")


def test_missing_prompt_key_names_line_and_fix(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"text": "wrong key"}])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: missing required key 'prompt'.*\['text'\].*Add it"):
        data.load_prompts(path, tmp_path / "tfds")


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": ""}, "non-empty string"),
        ({"prompt": 3}, "non-empty string"),
        ({"prompt": "x", "category": 1}, "'category' must be a string"),
        ({"prompt": "x", "id": [1]}, "'id' must be a string or an integer"),
        (["prompt"], "expected a JSON object"),
    ],
)
def test_bad_jsonl_fields(tmp_path, row, match):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, row])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: .*" + match):
        data.parse_prompt_file(path)


def test_bad_suffix_and_encoding(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"suffix '\.csv'.*\.txt.*\.jsonl"):
        data.load_prompts(path, tmp_path / "tfds")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt:2: not valid UTF-8"):
        data.parse_prompt_file(bad)


# --------------------------------------------------------------------------- #
# PromptStream
# --------------------------------------------------------------------------- #


def _stream(source, **kw):
    kw.setdefault("seed", 0)
    kw.setdefault("batch_size", 2)
    batch_size = kw.pop("batch_size")
    return data.PromptStream(source, batch_size, **kw)


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def test_stream_batches_hold_prompts_and_categories(prompt_source):
    batch = next(_stream(prompt_source, batch_size=4))
    assert len(batch.prompts) == len(batch.categories) == len(batch.ids) == 4
    for i, p, c in zip(batch.indices, batch.prompts, batch.categories):
        assert p == f"prompt {i}" and c == f"c{i % 3}"
    assert batch.indices.dtype == np.int64


def test_stream_deterministic_and_epochs_differ(prompt_source):
    a = _take(_stream(prompt_source, batch_size=5), 6)
    b = _take(_stream(prompt_source, batch_size=5), 6)
    assert [x.prompts for x in a] == [x.prompts for x in b]
    # 10 records, global batch 5 -> 2 batches per epoch, each epoch a permutation.
    epochs = [np.concatenate([a[2 * e].indices, a[2 * e + 1].indices]) for e in range(3)]
    for e, idx in enumerate(epochs):
        assert sorted(idx.tolist()) == list(range(10))
        assert set(a[2 * e].epochs.tolist()) == {e}
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    other_seed = _take(_stream(prompt_source, batch_size=5, seed=1), 2)
    assert [x.prompts for x in other_seed] != [x.prompts for x in a[:2]]
    # The order is the documented one: np.random.default_rng([seed, epoch]).
    np.testing.assert_array_equal(epochs[1], np.random.default_rng([0, 1]).permutation(10))


def test_no_shuffle_is_file_order(prompt_source):
    batches = _take(_stream(prompt_source, batch_size=4, shuffle=False), 3)
    flat = np.concatenate([b.indices for b in batches])
    np.testing.assert_array_equal(flat, np.arange(12) % 10)


@pytest.mark.parametrize("n, batch_size, process_count", [(10, 3, 2), (12, 3, 2), (10, 2, 3)])
def test_processes_get_disjoint_shards_covering_each_epoch(n, batch_size, process_count):
    source = [{"prompt": f"p{i}"} for i in range(n)]
    streams = [
        _stream(source, batch_size=batch_size, seed=5, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    steps = 3 * n  # enough for several full epochs
    seen: dict[int, list[int]] = {}
    for _ in range(steps):
        for s in streams:
            b = next(s)
            assert len(b.prompts) == batch_size
            for e, i in zip(b.epochs.tolist(), b.indices.tolist()):
                seen.setdefault(e, []).append(i)
    complete = [e for e in seen if e < max(seen)]
    assert len(complete) >= 2
    for e in complete:  # each complete epoch: every record exactly once over all processes
        assert sorted(seen[e]) == list(range(n))
    # Within one step, processes take disjoint positions of the global batch.
    for step in range(5):
        pos = [s.batch_at(step) for s in streams]
        pairs = [(e, i) for b in pos for e, i in zip(b.epochs.tolist(), b.indices.tolist())]
        assert len(set(pairs)) == len(pairs)


def test_batch_at_is_pure_and_matches_iteration(prompt_source):
    s = _stream(prompt_source, batch_size=3, process_index=1, process_count=2)
    expected = _take(_stream(prompt_source, batch_size=3, process_index=1, process_count=2), 8)
    for step in [5, 0, 7, 3]:
        got = s.batch_at(step)
        assert got.prompts == expected[step].prompts
        np.testing.assert_array_equal(got.epochs, expected[step].epochs)
    assert s.state()["epoch"] == 0 and s.state()["offset"] == 0  # untouched
    s.seek(4)
    assert next(s).prompts == expected[4].prompts


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_resume_continues_exactly(prompt_source, drop_remainder):
    kw = dict(batch_size=3, process_index=0, process_count=2, seed=3, drop_remainder=drop_remainder)
    uninterrupted = _take(_stream(prompt_source, **kw), 12)
    first = _stream(prompt_source, **kw)
    _take(first, 5)
    saved = json.loads(json.dumps(first.state()))  # survives a JSON/ckpt round trip
    resumed = _stream(prompt_source, **kw)
    resumed.restore(saved)
    rest = _take(resumed, 7)
    assert [b.prompts for b in rest] == [b.prompts for b in uninterrupted[5:]]
    assert [b.indices.tolist() for b in rest] == [b.indices.tolist() for b in uninterrupted[5:]]


def test_resume_on_other_process_count_same_global_batch(prompt_source):
    # 2 processes x 2 prompts saved, resumed on 1 process x 4: same prompts consumed.
    two = [_stream(prompt_source, batch_size=2, process_index=p, process_count=2) for p in range(2)]
    one = _stream(prompt_source, batch_size=4)
    for _ in range(3):
        for s in two:
            next(s)
    one.restore(two[0].state())
    nxt = [next(s) for s in two]
    interleaved = [nxt[k % 2].indices[k // 2] for k in range(4)]
    assert next(one).indices.tolist() == [int(i) for i in interleaved]


def test_restore_rejects_other_seed_or_data(prompt_source):
    state = _stream(prompt_source, seed=1).state()
    with pytest.raises(ValueError, match="seed 1.*uses 2"):
        _stream(prompt_source, seed=2).restore(state)
    with pytest.raises(ValueError, match="saved for 10 records.*has 4"):
        _stream([{"prompt": "x"}] * 4, seed=1).restore(state)


def test_dataset_smaller_than_batch_wraps_epochs():
    source = [{"prompt": f"p{i}", "category": "k"} for i in range(3)]
    s = _stream(source, batch_size=4, process_index=0, process_count=2)  # global batch 8 > 3
    other = _stream(source, batch_size=4, process_index=1, process_count=2)
    flat_e, flat_i = [], []
    for _ in range(3):  # 24 positions = 8 whole epochs
        a, b = next(s), next(other)
        assert len(a.prompts) == 4 and a.categories == ["k"] * 4
        # Re-interleave to global order to check the epoch structure.
        for k in range(4):
            for x in (a, b):
                flat_e.append(int(x.epochs[k]))
                flat_i.append(int(x.indices[k]))
    assert flat_e == [p // 3 for p in range(24)]
    for e in range(8):
        assert sorted(flat_i[3 * e : 3 * e + 3]) == [0, 1, 2]


def test_drop_remainder_semantics():
    source = [{"prompt": f"p{i}"} for i in range(10)]
    s = _stream(source, batch_size=4, drop_remainder=True)
    assert s.steps_per_epoch == 2
    batches = _take(s, 6)
    for e in range(3):
        a, b = batches[2 * e], batches[2 * e + 1]
        assert set(a.epochs.tolist()) == set(b.epochs.tolist()) == {e}
        idx = np.concatenate([a.indices, b.indices])
        assert len(set(idx.tolist())) == 8  # distinct; the epoch's last 2 dropped
        np.testing.assert_array_equal(idx, np.random.default_rng([0, e]).permutation(10)[:8])
    with pytest.raises(ValueError, match="drop_remainder=True needs at least one full global batch"):
        _stream(source, batch_size=6, process_count=2, drop_remainder=True)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(process_index=2, process_count=2), "process_index"),
        (dict(seed=-1), "seed"),
    ],
)
def test_stream_argument_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _stream([{"prompt": "x"}], **kw)


# --------------------------------------------------------------------------- #
# Preference pairs
# --------------------------------------------------------------------------- #


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


@pytest.fixture
def pair_files(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {
        "imgs/a0.png": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8),
        "imgs/b0.png": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8),
        "imgs/a1.png": rng.integers(0, 256, (3, 8, 3), dtype=np.uint8),
        "imgs/rgba.png": rng.integers(0, 256, (4, 4, 4), dtype=np.uint8),
        "imgs/grey.png": rng.integers(0, 256, (4, 4), dtype=np.uint8),
    }
    for rel, arr in imgs.items():
        _png(tmp_path / rel, arr)
    rows = [
        {"prompt": "a red cube", "image_a": "imgs/a0.png", "image_b": "imgs/b0.png", "label": 1},
        {"prompt": "a blue cube", "image_a": "imgs/a1.png", "image_b": "imgs/a0.png", "label": 0.0},
        {"prompt": "a tie", "image_a": "imgs/rgba.png", "image_b": "imgs/grey.png", "label": 0.5},
    ]
    path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    return path, rows, imgs


def test_preference_pairs_round_trip(tmp_path, pair_files):
    path, rows, imgs = pair_files
    src = data.load_preference_pairs(path, tmp_path / "tfds")
    assert len(src) == 3
    assert sorted(src.builder.info.features.keys()) == sorted(
        ["prompt", "image_a", "image_b", "label", "index"]
    )
    assert list(tmp_path.glob("tfds/**/*.array_record*"))
    expected = {
        **imgs,
        "imgs/rgba.png": imgs["imgs/rgba.png"][..., :3],  # alpha dropped: RGB only
        "imgs/grey.png": np.repeat(imgs["imgs/grey.png"][..., None], 3, axis=-1),
    }
    for k, (rec, row) in enumerate(zip(src, rows)):
        assert rec["prompt"] == row["prompt"] and rec["index"] == k
        assert rec["label"] == pytest.approx(row["label"])
        for key in ("image_a", "image_b"):
            assert rec[key].dtype == np.uint8 and rec[key].shape[-1] == 3
            np.testing.assert_array_equal(rec[key], expected[row[key]])


def test_preference_pairs_explicit_image_root_and_image_change(tmp_path, pair_files):
    path, rows, imgs = pair_files
    moved = tmp_path / "elsewhere" / "pairs.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(path.read_bytes())
    src = data.load_preference_pairs(moved, tmp_path / "tfds", image_root=tmp_path)
    # Replacing an image (same JSONL) re-prepares: images are part of the key.
    new = 255 - imgs["imgs/a0.png"]
    _png(tmp_path / "imgs/a0.png", new)
    src2 = data.load_preference_pairs(moved, tmp_path / "tfds", image_root=tmp_path)
    assert src2.builder.data_dir != src.builder.data_dir
    np.testing.assert_array_equal(src2[0]["image_a"], new)
    np.testing.assert_array_equal(src[0]["image_a"], imgs["imgs/a0.png"])  # old data intact


@pytest.mark.parametrize(
    "row, match",
    [
        ({"image_a": "imgs/a0.png", "image_b": "imgs/b0.png", "label": 1}, "missing required key 'prompt'"),
        ({"prompt": "x", "image_b": "imgs/b0.png", "label": 1}, "missing required key 'image_a'"),
        ({"prompt": "x", "image_a": "imgs/a0.png", "image_b": "imgs/b0.png"}, "missing required key 'label'"),
        ({"prompt": "x", "image_a": "imgs/a0.png", "image_b": "imgs/b0.png", "label": 2}, r"'label' must lie in \[0, 1\]"),
        ({"prompt": "x", "image_a": "imgs/a0.png", "image_b": "imgs/b0.png", "label": "a"}, "'label' must be a number"),
        ({"prompt": "x", "image_a": "imgs/a0.png", "image_b": "imgs/b0.png", "label": True}, "'label' must be a number"),
        ({"prompt": "x", "image_a": "imgs/a0.png", "image_b": "imgs/zz.png", "label": 1}, r"image_b file .*zz\.png' does not exist"),
        ({"prompt": "x", "image_a": "/abs/a.png", "image_b": "imgs/b0.png", "label": 1}, "absolute path"),
    ],
)
def test_preference_pair_errors_name_line(tmp_path, pair_files, row, match):
    path, rows, _ = pair_files
    _write_jsonl(path, [rows[0], row])
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: .*" + match):
        data.load_preference_pairs(path, tmp_path / "tfds")


def test_preference_pair_undecodable_image(tmp_path, pair_files):
    path, rows, _ = pair_files
    (tmp_path / "imgs/a0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: cannot decode image"):
        data.load_preference_pairs(path, tmp_path / "tfds")


def test_preference_pair_missing_root(tmp_path, pair_files):
    path, _, _ = pair_files
    with pytest.raises(FileNotFoundError, match="Image root"):
        data.load_preference_pairs(path, tmp_path / "tfds", image_root=tmp_path / "missing")
