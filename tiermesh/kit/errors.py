"""Errors a servicer raises, each mapped to one gRPC status by the kit's interceptor.

Servicers raise `InvalidArgument("texts[3]", "must not be empty")` instead of calling
`context.abort` themselves, so every tier words its errors the same way (`<field>: <reason>`)
and engines stay free of gRPC.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor


class RpcError(Exception):
    """Base for errors with a gRPC status; the message is sent to the caller as is."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(RpcError):
    """A request field is out of bounds; the message names the field and the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


class Unavailable(RpcError):
    """The tier (or a dependency) cannot serve right now; the caller may retry elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(RpcError):
    """The tier (or one it calls) is at its limit; the caller should retry after a pause."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(RpcError):
    """The request is valid but the system is not in a state to answer it (e.g. version mismatch)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(RpcError):
    """The caller's deadline passed before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def overloaded(error: grpc.RpcError) -> bool:
    """Whether a call was refused for load: by the tier's own limit (RESOURCE_EXHAUSTED) or by
    Envoy's circuit breaker (UNAVAILABLE, reset reason `overflow`)."""
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return True
    return error.code() == grpc.StatusCode.UNAVAILABLE and "overflow" in (error.details() or "")


def from_downstream(hop: str, error: grpc.aio.AioRpcError) -> RpcError:
    """What to answer when a call to another tier failed, naming it: its deadline, its load
    refusal (so the caller backs off), or unavailable."""
    detail = f"{hop}: {error.code().name}: {error.details()}"
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(detail)
    if overloaded(error):
        return ResourceExhausted(detail)
    return Unavailable(detail)


def check_text(value: str, field: str, *, max_chars: int) -> None:
    """Reject empty, whitespace-only and oversized texts, naming the field."""
    if not value.strip():
        raise InvalidArgument(field, "must not be empty")
    if len(value) > max_chars:
        raise InvalidArgument(field, f"is {len(value)} characters; the limit is {max_chars}")


def check_count(count: int, field: str, *, low: int, high: int) -> None:
    """Reject a repeated field with fewer than `low` or more than `high` items."""
    if count < low:
        raise InvalidArgument(field, f"needs at least {low} item(s), got {count}")
    if count > high:
        raise InvalidArgument(field, f"has {count} items; the limit is {high}")


# -- requests that do not decode ---------------------------------------------------------------
# protobuf rejects a string field holding invalid UTF-8 with a bare DecodeError. To tell the
# caller *which* field, the bytes are parsed again with a twin message type whose string fields
# are bytes, and the first field that is not valid UTF-8 is named.


def explain_undecodable(message_class: type[message.Message], data: bytes) -> str:
    """Say why `data` does not decode as `message_class`, naming the field where possible."""
    twin = _bytes_twin(message_class.DESCRIPTOR.full_name, message_class.DESCRIPTOR.file)
    try:
        parsed = twin.FromString(data)
    except message.DecodeError:
        return "request: is not a valid protobuf message"
    for path, value in _string_fields(parsed, message_class.DESCRIPTOR):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as error:
            return f"{path}: is not valid UTF-8 (byte {error.start})"
    return "request: is not a valid protobuf message"


def _string_fields(
    msg: message.Message, original: Descriptor, prefix: str = ""
) -> Iterator[tuple[str, bytes]]:
    for twin_field, value in msg.ListFields():
        field = original.fields_by_name[twin_field.name]
        path = prefix + field.name
        values = list(value) if field.is_repeated else [value]
        for index, item in enumerate(values):
            item_path = f"{path}[{index}]" if field.is_repeated else path
            if field.type == FieldDescriptor.TYPE_STRING:
                yield item_path, item
            elif field.type == FieldDescriptor.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
                yield from _string_fields(item, field.message_type, item_path + ".")


@functools.cache
def _bytes_twin(full_name: str, file: FileDescriptor) -> type[message.Message]:
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file_descriptor: FileDescriptor) -> None:
        if file_descriptor.name in added:
            return
        for dependency in file_descriptor.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file_descriptor.CopyToProto(proto)
        for message_type in proto.message_type:
            _strings_to_bytes(message_type)
        pool.Add(proto)
        added.add(file_descriptor.name)

    add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


def _strings_to_bytes(message_type: descriptor_pb2.DescriptorProto) -> None:
    for field in message_type.field:
        if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
            field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    for nested in message_type.nested_type:
        _strings_to_bytes(nested)
