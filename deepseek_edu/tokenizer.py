"""A byte-level BPE tokenizer (the `tokenizers` library) trained on the train split, cached per corpus.

*Tokenizer.* Byte-level BPE from the `tokenizers` library. Every string is first turned into
UTF-8 bytes, so any Unicode text round-trips exactly: ``decode(encode(s)) == s``. Two traps
(pitfalls kind J): one character may span several tokens, so decoding tokens one at a time yields
broken UTF-8 (U+FFFD) -- stream with `IncrementalDecoder`; and a BOS must be added once, by the
caller's request, never twice. Special tokens (ids 0..6) typed in the text, e.g. ``"<think>"``,
become their special ids (the library default, which the reasoning chapters rely on); decoding
restores the text, so the round trip still holds.

Re-exported by `data.py`.
"""

from __future__ import annotations

import codecs
import json
import operator
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch import Tensor

from .corpus import (
    CACHE_FORMAT,
    SPLIT_SEED,
    Document,
    docs_digest,
    load_corpus,
    resolve_cache_dir,
    split_documents,
)
from .io import atomic_write

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<think>", "</think>", "<answer>", "</answer>"]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, plus the reserved special tokens


# --- tokenizer ----------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE tokens are spelled in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:  # control bytes, space, etc. move to U+0100 and up
            table[b], extra = chr(256 + extra), extra + 1
    return table


def is_int_vector(t: object) -> bool:
    """True for a 1-D tensor of integer dtype (bool, float and complex are not token ids)."""
    if not isinstance(t, Tensor) or t.dim() != 1:
        return False
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _id_list(ids: Sequence[int] | Tensor) -> list[int]:
    """A list of Python ints from a list, a 1-D integer tensor or a 0-d one (a single id)."""
    if isinstance(ids, Tensor):
        if ids.dim() > 1 or not is_int_vector(ids.reshape(-1)):
            raise ValueError(f"expected a 1-D integer tensor of token ids, got {tuple(ids.shape)} "
                             f"{ids.dtype}")
        ids = ids.reshape(-1).tolist()
    if isinstance(ids, (str, bytes, bytearray, memoryview)):  # text or raw bytes, not ids
        raise TypeError(f"token ids must be integers, got {type(ids).__name__} {ids!r}")
    if isinstance(ids, (set, frozenset, dict)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"token ids must be an ordered sequence of integers, got {type(ids).__name__}")
    out = []
    for i in ids:
        if isinstance(i, bool) or (isinstance(i, Tensor) and i.dtype == torch.bool):
            raise TypeError(f"token ids must be integers, got {i!r}")
        out.append(operator.index(i))
    return out


class Tokenizer:
    """Byte-level BPE tokenizer: a thin, checked wrapper around `tokenizers.Tokenizer`.

    Ids are in [0, vocab_size); ids 0..6 are `SPECIAL_TOKENS` in order (bos, eos, pad, <think>,
    </think>, <answer>, </answer>), the next 256 are the bytes, the rest BPE merges.
    """

    def __init__(self, backend: tokenizers.Tokenizer):
        for i, tok in enumerate(SPECIAL_TOKENS):
            if backend.token_to_id(tok) != i:
                raise ValueError(f"special token {tok!r} must have id {i}, has {backend.token_to_id(tok)}")
        if not (backend.normalizer is None and isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel)
                and isinstance(backend.decoder, decoders.ByteLevel)):
            raise ValueError("expected a byte-level BPE: no normalizer, ByteLevel pre-tokenizer and decoder")
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        spellings = [backend.id_to_token(i) for i in range(self.vocab_size)]
        self._id_bytes = [  # id -> the UTF-8 bytes the token stands for
            s.encode() if i in added else bytes(char_to_byte[c] for c in s) for i, s in enumerate(spellings)
        ]

    @property
    def bos_id(self) -> int:
        """Id of <|bos|> (0)."""
        return 0

    @property
    def eos_id(self) -> int:
        """Id of <|eos|> (1): separates documents, ends answers."""
        return 1

    @property
    def pad_id(self) -> int:
        """Id of <|pad|> (2): fills ragged batches; losses must ignore it."""
        return 2

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

    @staticmethod
    def _check_text(text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates, e.g. from a broken JSON escape
            bad = text[e.start:e.end]
            raise ValueError(f"text is not valid Unicode at index {e.start}: {bad!r}") from None

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and ids[:1] != [self.bos_id]:  # a <|bos|> already typed in the text is not doubled
            ids = [self.bos_id, *ids]
        if eos and ids[-1:] != [self.eos_id]:
            ids = [*ids, self.eos_id]
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; `bos`/`eos` make it start/end with exactly one BOS/EOS.

        Nothing is added unless asked. Special-token text in the input ("<think>") becomes its id.

        Raises:
            TypeError: text is not a str.  ValueError: text holds a lone surrogate (not UTF-8 encodable).
        """
        self._check_text(text)
        return self._wrap(self.backend.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """`encode` of each text, computed in parallel by the library."""
        texts = list(texts)
        for t in texts:
            self._check_text(t)
        # encode_batch_fast (tokenizers >= 0.21) skips character offsets: same ids, ~2x faster
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [self._wrap(e.ids, bos, eos) for e in encode(texts, add_special_tokens=False)]

    def _checked(self, ids: Sequence[int] | Tensor) -> list[int]:
        ids = _id_list(ids)
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside [0, vocab_size={self.vocab_size})")
        return ids

    def decode(self, ids: Sequence[int] | Tensor, skip_special: bool = False) -> str:
        """Text of a whole sequence of ids; ``decode(encode(s)) == s`` for every valid str.

        Decode whole sequences: a character split across tokens decoded piecewise gives U+FFFD; for
        streamed output use `IncrementalDecoder`. Invalid UTF-8 (possible from sampled ids) becomes U+FFFD.

        Args:
            ids: (N,) ints, a list or a 1-D integer tensor.
            skip_special: drop special tokens instead of writing their text.
        Raises:
            ValueError: an id outside [0, vocab_size), or a tensor that is not 1-D integer.
            TypeError: ids that are not integers (floats, bools, str or bytes), or an unordered container.
        """
        return self.backend.decode(self._checked(ids), skip_special_tokens=skip_special)

    def decode_bytes(self, ids: Sequence[int] | Tensor, skip_special: bool = False) -> bytes:
        """The raw UTF-8 bytes of `ids` (may end inside a character). Same errors as `decode`."""
        return b"".join(self._id_bytes[i] for i in self._checked(ids)
                        if not (skip_special and i in self._special_ids))

    def token_to_id(self, token: str) -> int | None:
        """Id of a token spelled in the byte-level alphabet (" the" is "Ġthe"), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        """Spelling of token `i` in the byte-level alphabet. Raises ValueError when out of range."""
        return self.backend.id_to_token(self._checked([i])[0])

    def save(self, path: str | Path) -> None:
        """Write the library's tokenizer JSON to `path`, atomically."""
        atomic_write(path, writer=lambda tmp: self.backend.save(str(tmp)))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer JSON written by `save` (checks the special ids and byte-level pipeline)."""
        return cls(tokenizers.Tokenizer.from_file(str(path)))


class IncrementalDecoder:
    """Turn a stream of token ids into text, emitting only complete UTF-8 characters.

    ``"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)`` for ids that decode to
    valid UTF-8; bytes of an unfinished character wait for the next token. Invalid bytes (e.g. from
    sampling) become U+FFFD instead of raising.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: int | Sequence[int] | Tensor) -> str:
        """Feed one id (a Python or NumPy integer, a 0-d array or tensor) or several; returns the text completed
        by them (possibly ""). Raises ValueError for an id outside [0, vocab_size) or a tensor that is not of
        integers, TypeError for another non-integer (a float, a bool, bytes)."""
        if not isinstance(ids, (Tensor, Iterable)) or getattr(ids, "ndim", None) == 0 and not isinstance(ids, Tensor):
            ids = [ids]  # int, np.int64, a 0-d NumPy array: one id
        return self._utf8.decode(self.tokenizer.decode_bytes(ids, self.skip_special))

    def flush(self) -> str:
        """End of stream: an unfinished character becomes U+FFFD. The decoder is then empty."""
        return self._utf8.decode(b"", final=True)


def check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size!r} must be an integer >= {MIN_VOCAB_SIZE} "
                         f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> Tokenizer:
    """Train a byte-level BPE on `texts`. Same texts in the same order give the same tokenizer.

    The vocabulary is at most `vocab_size`: a tiny corpus may run out of pairs to merge.

    Raises:
        ValueError: vocab_size < MIN_VOCAB_SIZE (263).
    """
    check_vocab_size(vocab_size)
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # " the" and "the" stay distinct
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(  # the Rust progress bar would bypass Python's streams: keep it off
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS, show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)


def split_suffix(val_fraction: float) -> str:
    return "" if val_fraction == 0.1 else f"-val{val_fraction:g}"


def cached_tokenizer(corpus_name: str, train_docs: list[Document], vocab_size: int, val_fraction: float,
                   root: Path) -> Tokenizer:
    """The cached tokenizer trained on `train_docs`, trained and cached now if needed."""
    path = root / "tokenizers" / f"{corpus_name}-{vocab_size}{split_suffix(val_fraction)}.json"
    key = {"format": CACHE_FORMAT, "train_sha256": docs_digest(train_docs), "vocab_size": vocab_size,
           "split_seed": SPLIT_SEED}
    meta = path.with_suffix(".meta.json")  # what the tokenizer was trained on; stale => retrain
    try:
        if json.loads(meta.read_text()) == key:
            return Tokenizer.load(path)
    except Exception:  # missing, corrupt or foreign file (the library raises bare Exception): retrain
        pass
    tok = train_tokenizer((d.text for d in train_docs), vocab_size)
    if tok.vocab_size != vocab_size:
        raise ValueError(f"corpus {corpus_name!r} only supports {tok.vocab_size} tokens; vocab_size="
                         f"{vocab_size} must be <= {tok.vocab_size}")
    tok.save(path)
    atomic_write(meta, json.dumps(key).encode())  # after the tokenizer: a crash in between retrains
    return tok


def load_tokenizer(corpus_name: str = "shakespeare", vocab_size: int = 2048,
                   cache_dir: str | Path | None = None, val_fraction: float = 0.1,
                   progress: bool = True) -> Tokenizer:
    """The tokenizer of a corpus, trained on its train split only and cached (~2 s to train).

    Cached as ``cache_dir/tokenizers/{corpus_name}-{vocab_size}.json`` (a ``-val{f}`` suffix for
    another val_fraction), with a ``.meta.json`` of what it was trained on.

    Raises:
        ValueError: vocab_size < 263, or larger than the corpus can fill; plus `load_corpus` errors.
    """
    check_vocab_size(vocab_size)
    train_docs, _ = split_documents(load_corpus(corpus_name, cache_dir, progress), val_fraction)
    return cached_tokenizer(corpus_name, train_docs, vocab_size, val_fraction, resolve_cache_dir(cache_dir))
