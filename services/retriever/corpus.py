"""Knowledge-base corpora: load JSONL, CSV or Parquet into passages, chunking long documents.

A document needs an `id` and a `text`; `title`, `section` and `metadata` are optional. In CSV and
Parquet, columns other than those become metadata. A document longer than the model's window is
split into overlapping chunks on paragraph and sentence boundaries, each a passage that keeps its
document's id, title, section and metadata plus its `chunk_index`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

KNOWLEDGE_DIR = Path(__file__).parent / "knowledge"
DEFAULT_CORPUS = KNOWLEDGE_DIR / "loans.jsonl"
DEFAULT_QUESTIONS = KNOWLEDGE_DIR / "questions.jsonl"

# MiniLM reads 256 word pieces; English prose averages ~1.3 pieces a word, so 160 words fit.
MAX_WORDS = 160
OVERLAP_WORDS = 30
_KNOWN = ("id", "text", "title", "section", "metadata")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class CorpusError(ValueError):
    """The corpus cannot be used; the message names the file, the line and the field."""


@dataclasses.dataclass(frozen=True)
class Passage:
    """One searchable chunk of a document."""

    doc_id: str
    chunk_index: int
    title: str
    section: str
    text: str
    metadata: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Passage:
        return cls(**data)


def chunk(text: str, *, max_words: int = MAX_WORDS, overlap: int = OVERLAP_WORDS) -> list[str]:
    """Split `text` into pieces of at most `max_words` words.

    Paragraphs are packed whole while they fit; a longer paragraph is cut at sentence ends, and
    a sentence longer than the window at word boundaries. Consecutive chunks share about
    `overlap` words so an answer straddling a cut is still found.
    """
    words = text.split()
    if len(words) <= max_words:
        return [" ".join(words)]
    sentences = [
        sentence.split()
        for paragraph in re.split(r"\n\s*\n", text)
        for sentence in _SENTENCE_END.split(paragraph.strip())
        if sentence.strip()
    ]
    pieces: list[list[str]] = []
    for sentence in sentences:  # a sentence longer than the window is cut into windows
        step = max_words - overlap
        pieces.extend(sentence[i : i + max_words] for i in range(0, max(1, len(sentence) - overlap), step))
    chunks: list[list[list[str]]] = [[]]
    for piece in pieces:
        current = chunks[-1]
        if current and _words(current) + len(piece) > max_words:
            carry: list[list[str]] = []
            for previous in reversed(current):
                if _words(carry) + len(previous) > overlap:
                    break
                carry.insert(0, previous)
            chunks.append(carry if _words(carry) + len(piece) <= max_words else [])
        chunks[-1].append(piece)
    return [" ".join(word for piece in pieces for word in piece) for pieces in chunks if pieces]


def _words(pieces: list[list[str]]) -> int:
    return sum(len(piece) for piece in pieces)


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, raw record) pairs from a JSONL, CSV or Parquet file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise CorpusError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                if not isinstance(record, dict):
                    raise CorpusError(f"{path}:{number}: expected a JSON object per line")
                yield f"{path}:{number}", record
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            for number, row in enumerate(csv.DictReader(handle), 2):
                yield f"{path}:{number}", dict(row)
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise CorpusError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        for number, row in enumerate(parquet.read_table(path).to_pylist(), 1):
            yield f"{path} row {number}", row
    else:
        raise CorpusError(f"{path}: unknown corpus format {suffix!r} (use .jsonl, .csv or .parquet)")


def _metadata(location: str, record: dict[str, Any]) -> dict[str, str]:
    metadata = record.get("metadata") or {}
    if isinstance(metadata, str):  # CSV cells hold JSON text
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            raise CorpusError(f"{location}: field 'metadata' is not a JSON object") from None
    if not isinstance(metadata, dict):
        raise CorpusError(f"{location}: field 'metadata' must be an object of strings")
    extra = {k: v for k, v in record.items() if k not in _KNOWN and v not in (None, "")}
    merged = {**extra, **metadata}
    for key, value in merged.items():
        if isinstance(value, (dict, list)):
            raise CorpusError(f"{location}: metadata {key!r} must be a string, number or boolean")
    return {str(k): str(v) for k, v in merged.items()}


def passages_of(records: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[Passage]:
    """Validate documents and yield their passages, chunking long texts."""
    seen: dict[str, str] = {}
    for location, record in records:
        doc_id, text = record.get("id"), record.get("text")
        if doc_id is None or str(doc_id).strip() == "":
            raise CorpusError(f"{location}: field 'id' is missing or empty")
        doc_id = str(doc_id).strip()
        if doc_id in seen:
            raise CorpusError(f"{location}: id {doc_id!r} repeats the document at {seen[doc_id]}")
        seen[doc_id] = location
        if not isinstance(text, str) or not text.strip():
            raise CorpusError(f"{location}: field 'text' is missing or empty (id {doc_id!r})")
        title, section = str(record.get("title") or ""), str(record.get("section") or "")
        metadata = _metadata(location, record)
        for index, piece in enumerate(chunk(text)):
            yield Passage(doc_id, index, title, section, piece, metadata)


def load(path: Path) -> list[Passage]:
    """Every passage of the corpus file at `path`; raises CorpusError naming the first problem."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such corpus file")
    found = list(passages_of(_records(path)))
    if not found:
        raise CorpusError(f"{path}: the corpus has no documents")
    return found


def load_questions(path: Path) -> list[str]:
    """Evaluation queries: JSONL with a `question` (or `text`) per line, or plain text lines."""
    questions = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            record = json.loads(line)
            line = str(record.get("question") or record.get("text") or "").strip()
        if line:
            questions.append(line)
    return questions
