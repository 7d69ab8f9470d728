"""Corpus loading and chunking: formats, metadata, and errors that name the line and field."""

import itertools
import json

import pytest

from services.retriever.corpus import MAX_WORDS, CorpusError, chunk, load, load_questions


def test_short_text_is_one_chunk_with_whitespace_normalised():
    assert chunk("What  is\nAPR?") == ["What is APR?"]


def test_long_text_is_cut_into_overlapping_windows_within_the_limit():
    sentences = [f"Sentence number {i} explains one more detail of amortisation." for i in range(60)]
    pieces = chunk(" ".join(sentences))
    assert len(pieces) > 1
    assert all(len(piece.split()) <= MAX_WORDS for piece in pieces)
    for before, after in itertools.pairwise(pieces):
        assert before.split(".")[-2].strip() in after  # the next chunk repeats the last sentence
    joined = " ".join(pieces)
    assert all(sentence in joined for sentence in sentences)


def test_a_sentence_longer_than_the_window_is_cut_at_words():
    words = [f"w{i}" for i in range(400)]
    pieces = chunk(" ".join(words))
    assert all(len(piece.split()) <= MAX_WORDS for piece in pieces)
    assert set(" ".join(pieces).split()) == set(words)


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_jsonl_with_chunking_keeps_document_fields(tmp_path):
    long_text = "\n\n".join(
        f"Paragraph {i}. " + "Interest accrues daily on the balance. " * 12 for i in range(4)
    )
    path = write_jsonl(
        tmp_path / "kb.jsonl",
        [
            {
                "id": "a",
                "title": "APR",
                "section": "Rates",
                "text": "APR is the yearly cost.",
                "metadata": {"k": 1},
            },
            {"id": "b", "title": "Guide", "text": long_text},
        ],
    )
    found = load(path)
    assert found[0].doc_id == "a" and found[0].metadata == {"k": "1"} and found[0].section == "Rates"
    guide = [p for p in found if p.doc_id == "b"]
    assert len(guide) > 1 and [p.chunk_index for p in guide] == list(range(len(guide)))
    assert all(p.title == "Guide" for p in guide)


def test_csv_extra_columns_become_metadata(tmp_path):
    path = tmp_path / "kb.csv"
    path.write_text("id,title,text,topic\n1,Fees,Late fees apply after 15 days.,fees\n")
    (passage,) = load(path)
    assert (passage.doc_id, passage.title, passage.metadata) == ("1", "Fees", {"topic": "fees"})


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "kb.parquet"
    pq.write_table(pa.table({"id": ["x"], "text": ["Refinancing replaces a loan."], "lang": ["en"]}), path)
    (passage,) = load(path)
    assert passage.text == "Refinancing replaces a loan." and passage.metadata == {"lang": "en"}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": "a", "text": "ok"}', "{not json"], "kb.jsonl:2: not valid JSON"),
        (['{"text": "no id"}'], "kb.jsonl:1: field 'id' is missing"),
        (['{"id": "a", "text": "  "}'], "kb.jsonl:1: field 'text' is missing or empty (id 'a')"),
        (['{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}'], "kb.jsonl:2: id 'a' repeats"),
        (['{"id": "a", "text": "x", "metadata": {"tags": ["a"]}}'], "metadata 'tags' must be a string"),
        (["[1, 2]"], "kb.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_corpus_names_the_line_and_field(tmp_path, lines, message):
    path = tmp_path / "kb.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(path)


def test_missing_empty_and_unknown_format(tmp_path):
    with pytest.raises(CorpusError, match="no such corpus file"):
        load(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(CorpusError, match="has no documents"):
        load(tmp_path / "empty.jsonl")
    (tmp_path / "kb.xml").write_text("<kb/>")
    with pytest.raises(CorpusError, match=r"unknown corpus format '\.xml'"):
        load(tmp_path / "kb.xml")


def test_questions_from_jsonl_or_plain_lines(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"question": "What is APR?", "doc_id": "x"}\n\n')
    (tmp_path / "q.txt").write_text("Is 40% DTI high?\n")
    assert load_questions(tmp_path / "q.jsonl") == ["What is APR?"]
    assert load_questions(tmp_path / "q.txt") == ["Is 40% DTI high?"]
