import pytest

from tiermesh.embedder.v1 import embedder_pb2
from tiermesh.kit.errors import InvalidArgument, check_count, check_text, explain_undecodable


def _with_bad_utf8(message, good: str) -> bytes:
    """Serialise `message`, then replace the UTF-8 of `good` with an invalid byte sequence."""
    data = message.SerializeToString()
    bad = b"\xff" * len(good.encode())
    assert good.encode() in data
    return data.replace(good.encode(), bad)


def test_names_the_repeated_field_item_that_is_not_utf8():
    data = _with_bad_utf8(embedder_pb2.EmbedBatchRequest(texts=["fine", "fine", "BROKEN"]), "BROKEN")
    assert (
        explain_undecodable(embedder_pb2.EmbedBatchRequest, data) == "texts[2]: is not valid UTF-8 (byte 0)"
    )


def test_names_a_singular_field():
    data = _with_bad_utf8(embedder_pb2.EmbedRequest(text="ok", model_version="VERSION"), "VERSION")
    assert explain_undecodable(embedder_pb2.EmbedRequest, data).startswith(
        "model_version: is not valid UTF-8"
    )


def test_garbage_is_reported_as_not_protobuf():
    assert (
        explain_undecodable(embedder_pb2.EmbedRequest, b"\xff\xff\xff")
        == "request: is not a valid protobuf message"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "t: must not be empty"),
        ("  \n", "t: must not be empty"),
        ("x" * 11, "t: is 11 characters; the limit is 10"),
    ],
)
def test_check_text(text, message):
    with pytest.raises(InvalidArgument, match=message):
        check_text(text, "t", max_chars=10)


def test_check_text_accepts_text_at_the_limit():
    check_text("x" * 10, "t", max_chars=10)


def test_check_count():
    with pytest.raises(InvalidArgument, match="texts: needs at least 1 item"):
        check_count(0, "texts", low=1, high=3)
    with pytest.raises(InvalidArgument, match="texts: has 4 items; the limit is 3"):
        check_count(4, "texts", low=1, high=3)
    check_count(3, "texts", low=1, high=3)
