"""Tiny CLIP and T5 tokenizers, trained in-process, saved in transformers layout.

For the toy world's shipped tokenizers (``toyworld.base_model.save_tokenizers``
trains them on the toy grammar's prompts) and for test fixtures (text-encoder
parity, the diffusers-format FLUX pipeline fixture): no download,
deterministic, a few hundred ms.

* ``save_clip_tokenizer(dir, vocab_size=...)``: byte-level BPE trained with the
  ``tokenizers`` library using CLIP's normaliser, pre-tokeniser and ``</w>``
  end-of-word suffix, then built and saved by transformers' ``CLIPTokenizer``.
  Id layout as in OpenAI's CLIP: the 256 byte symbols, the 256 byte symbols
  with ``</w>``, the merges, then ``<|startoftext|>`` (``vocab_size - 2``) and
  ``<|endoftext|>`` (``vocab_size - 1``); pad = unk = eos as in FLUX. So EOS is
  the largest id, and CLIP's legacy pooling rule (``eos_token_id == 2`` in the
  config: argmax of the ids) and the explicit rule pick the same position.
  Every input text is encodable (no unknown tokens: byte-level alphabet).
  ``vocab.json`` and ``merges.txt`` are written too (the classic layout).
* ``save_t5_tokenizer(dir, vocab_size=...)``: a Unigram model trained with the
  ``tokenizers`` library (Metaspace pre-tokenisation, as T5's), saved by
  transformers' ``T5TokenizerFast`` with ``<pad>`` = 0, ``</s>`` = 1,
  ``<unk>`` = 2 and no ``<extra_id_*>`` sentinels, so ``len(tokenizer) ==
  vocab_size``. Characters outside the corpus and printable ASCII map to
  ``<unk>``. ``whole_words=True`` adds every word of the corpus as a piece
  (``▁word``): on a tiny, repetitive corpus such as the toy grammar's the
  Unigram trainer keeps only a few dozen pieces and spells most words letter
  by letter, which would make prompts longer than the sequence length.

Both load with ``AutoTokenizer.from_pretrained(dir)`` and their own classes
(``CLIPTokenizer`` / ``T5TokenizerFast``, the types diffusers' ``FluxPipeline``
declares). ``len(tokenizer) == vocab_size`` exactly: when the corpus yields
fewer merges / pieces than asked, unreachable filler tokens pad the vocab.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

__all__ = ["CORPUS", "save_clip_tokenizer", "save_t5_tokenizer"]

_SUBJECTS = [
    "a red cube", "two blue spheres", "a small green cylinder", "three yellow stars",
    "a large purple cone", "an orange triangle", "the black cat", "a white dog",
    "four tiny pink circles", "a brown wooden table", "a photo of a mountain",
    "an astronaut", "a castle", "a bowl of fruit", "a glass bottle", "the old bicycle",
]
_RELATIONS = [
    "to the left of", "to the right of", "above", "below", "next to", "on top of",
    "behind", "in front of", "inside", "near",
]
_STYLES = [
    "in watercolor style", "as a pencil sketch", "in the style of a 1990s photograph",
    "with dramatic lighting", "at sunset", "on a sunny day", "in a snowy forest",
    "digital art, highly detailed", "oil painting, 4k", "minimalist, flat colors",
]
_EXTRA = [
    "A sign that says \"HELLO WORLD\" in bold letters.",
    "The number 42 written on a blackboard; chalk dust everywhere!",
    "Is it raining? Yes - it's pouring: umbrellas, puddles & reflections.",
    "Image 1 is better. Image 2 is better. Text Caption: [a cat on a mat]",
    "UniGenBench: style, world knowledge, attribute, action, relationship, compound,",
    "grammar, layout, logical reasoning, text. 0 1 2 3 4 5 6 7 8 9 10 100 2025",
]


def _build_corpus() -> list[str]:
    lines = []
    for i, s in enumerate(_SUBJECTS):
        for j, r in enumerate(_RELATIONS):
            o = _SUBJECTS[(i + 3 * j + 1) % len(_SUBJECTS)]
            style = _STYLES[(i + j) % len(_STYLES)]
            lines.append(f"{s} {r} {o}, {style}")
            if (i + j) % 4 == 0:
                lines.append(f"{s.capitalize()} {r} {o.upper()}.")
    return lines + _EXTRA


CORPUS: list[str] = _build_corpus()

# ---------------------------------------------------------------------------
# CLIP.

_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_MIN_VOCAB = 2 * 256 + 2


def _clip_merges(corpus: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Trains byte-level BPE with CLIP's pre-processing; returns merges by rank."""
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=_CLIP_MIN_VOCAB + n_merges + 1000,  # the alphabet counts too
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return merges[:n_merges]


def save_clip_tokenizer(
    directory: str | Path,
    vocab_size: int = 1000,
    *,
    model_max_length: int = 77,
    corpus: list[str] | None = None,
) -> None:
    """Trains and saves a tiny CLIP BPE tokenizer with exactly ``vocab_size`` ids.

    Args:
      directory: created if needed; receives tokenizer.json, tokenizer_config.json,
        vocab.json, merges.txt (and special_tokens_map.json where transformers
        writes it).
      vocab_size: at least 514 (256 bytes, 256 bytes + ``</w>``, BOS, EOS).
      model_max_length: what FluxPipeline pads CLIP prompts to (77 in FLUX);
        the CLIP text model needs at least this many positions.
      corpus: training lines (default: ``CORPUS``).
    """
    from transformers import CLIPTokenizer

    if vocab_size < _CLIP_MIN_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size} < {_CLIP_MIN_VOCAB}: a byte-level CLIP vocab needs the "
            "256 byte symbols, their 256 '</w>' forms and BOS/EOS."
        )
    n_merges = vocab_size - _CLIP_MIN_VOCAB
    byte_symbols = list(pre_tokenizers.ByteLevel.alphabet())
    byte_symbols.sort(key=_byte_order)
    vocab: dict[str, int] = {}
    for s in byte_symbols:
        vocab[s] = len(vocab)
    for s in byte_symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = []
    for a, b in _clip_merges(corpus or CORPUS, n_merges):
        if a in vocab and b in vocab and a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    filler = 0
    while len(vocab) < vocab_size - 2:  # unreachable: '<' and '|' never merge into it
        vocab[f"<|unused_{filler}|>"] = len(vocab)
        filler += 1
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    assert len(vocab) == vocab_size

    tok = CLIPTokenizer(
        vocab=vocab, merges=merges, unk_token=_EOS, bos_token=_BOS, eos_token=_EOS,
        pad_token=_EOS, model_max_length=model_max_length,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(directory))
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )


def _byte_order(symbol: str) -> int:
    """Orders ByteLevel's symbols by the byte they stand for (as GPT-2/CLIP do)."""
    return _UNICODE_TO_BYTE[symbol]


def _bytes_to_unicode() -> dict[int, str]:
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_UNICODE_TO_BYTE = {u: b for b, u in _bytes_to_unicode().items()}

# ---------------------------------------------------------------------------
# T5.

_T5_SPECIALS = ["<pad>", "</s>", "<unk>"]


def save_t5_tokenizer(
    directory: str | Path,
    vocab_size: int = 600,
    *,
    model_max_length: int = 512,
    corpus: list[str] | None = None,
    whole_words: bool = False,
) -> None:
    """Trains and saves a tiny T5 Unigram tokenizer with exactly ``vocab_size`` ids.

    ``<pad>`` = 0, ``</s>`` = 1 (appended to every sequence), ``<unk>`` = 2; no
    sentinel tokens. ``vocab_size`` must leave room for the alphabet (>= 200).
    ``whole_words``: also make every whitespace-separated word of the corpus a
    piece, scored by its corpus frequency, so each word is one token.
    """
    from transformers import T5TokenizerFast

    if vocab_size < 200:
        raise ValueError(f"vocab_size={vocab_size} < 200 leaves no room for the alphabet.")
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        special_tokens=_T5_SPECIALS,
        unk_token="<unk>",
        initial_alphabet=list(string.printable.strip()) + ["▁"],
        shrinking_factor=0.75,
        max_piece_length=12,
    )
    tok.train_from_iterator(corpus or CORPUS, trainer=trainer)
    pieces = json.loads(tok.to_str())["model"]["vocab"]  # [[piece, score], ...]
    assert [p for p, _ in pieces[:3]] == _T5_SPECIALS, pieces[:3]
    vocab = [(p, 0.0 if p in _T5_SPECIALS else float(s)) for p, s in pieces]
    if whole_words:
        words = dict(_word_pieces(corpus or CORPUS))
        if 3 + len(words) > vocab_size:
            raise ValueError(f"vocab_size={vocab_size} < 3 + {len(words)} corpus words.")
        # A word the trainer already kept as a piece keeps its id but gets the
        # word's score if that is higher.
        vocab = [(p, max(s, words.pop(p)) if p in words else s) for p, s in vocab]
        vocab = vocab[:3] + list(words.items()) + vocab[3:]
    vocab = vocab[:vocab_size]
    filler = 0
    while len(vocab) < vocab_size:  # contains '<', which no piece of real text starts
        vocab.append((f"<unused_{filler}>", -100.0))
        filler += 1

    t5 = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    t5.save_pretrained(str(directory))


def _word_pieces(corpus: list[str]) -> list[tuple[str, float]]:
    """``("▁word", log frequency)`` for each corpus word, most frequent first.

    The score is the log of the word's share of all words; Viterbi then prefers
    the one piece to spellings in several trained pieces (each scored like a
    log-probability too), which ``save_toy_tokenizers``' check confirms on the
    toy corpus: one token per word.
    """
    import math
    from collections import Counter

    counts = Counter(w for line in corpus for w in line.split())
    total = sum(counts.values())
    out = []
    for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        out.append(("\u2581" + word, math.log(n / total)))
    return out
