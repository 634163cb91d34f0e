"""Kubernetes' protobuf encoding of Secrets and ConfigMaps, read into their JSON form, for
the Kubernetes stand-in (:mod:`.kube_stand_in`).

client-go's typed clients (Helm's release storage is one) send built-in kinds as
``application/vnd.kubernetes.protobuf``: the magic ``k8s\\x00``, then a
``runtime.Unknown`` (its ``typeMeta``: apiVersion and kind; ``raw``: the object's own
message). This module declares, with the protobuf library, the part of Kubernetes'
``generated.proto`` files (k8s.io/api/core/v1, k8s.io/apimachinery meta/v1 and runtime;
same field numbers) that those two kinds use, and turns a body into the dict the JSON
encoding would have given. A field outside that part (``ownerReferences``,
``managedFields``, ...) is not guessed at: :class:`UnreadableBody` names the kind.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, unknown_fields

#: The content type client-go sends protobuf bodies with.
PROTOBUF: Final = "application/vnd.kubernetes.protobuf"
MAGIC: Final = b"k8s\x00"

_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL, _REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_STRING, _BYTES, _BOOL, _INT64, _INT32, _MESSAGE = (
    _F.TYPE_STRING,
    _F.TYPE_BYTES,
    _F.TYPE_BOOL,
    _F.TYPE_INT64,
    _F.TYPE_INT32,
    _F.TYPE_MESSAGE,
)
_PACKAGE: Final = "virtbackup.kube"

#: message -> [(field, number, type, repeated, message type or map value type)]; a map
#: field is ("map", value type): a repeated entry {1: string key, 2: value}.
_SCHEMA: Final[dict[str, list[tuple[str, int, Any, bool, Any]]]] = {
    "TypeMeta": [("apiVersion", 1, _STRING, False, None), ("kind", 2, _STRING, False, None)],
    "Unknown": [
        ("typeMeta", 1, _MESSAGE, False, "TypeMeta"),
        ("raw", 2, _BYTES, False, None),
        ("contentEncoding", 3, _STRING, False, None),
        ("contentType", 4, _STRING, False, None),
    ],
    "Time": [("seconds", 1, _INT64, False, None), ("nanos", 2, _INT32, False, None)],
    "ObjectMeta": [
        ("name", 1, _STRING, False, None),
        ("generateName", 2, _STRING, False, None),
        ("namespace", 3, _STRING, False, None),
        ("selfLink", 4, _STRING, False, None),
        ("uid", 5, _STRING, False, None),
        ("resourceVersion", 6, _STRING, False, None),
        ("generation", 7, _INT64, False, None),
        ("creationTimestamp", 8, _MESSAGE, False, "Time"),
        ("labels", 11, "map", True, _STRING),
        ("annotations", 12, "map", True, _STRING),
        ("finalizers", 14, _STRING, True, None),
    ],
    "Secret": [
        ("metadata", 1, _MESSAGE, False, "ObjectMeta"),
        ("data", 2, "map", True, _BYTES),
        ("type", 3, _STRING, False, None),
        ("stringData", 4, "map", True, _STRING),
        ("immutable", 5, _BOOL, False, None),
    ],
    "ConfigMap": [
        ("metadata", 1, _MESSAGE, False, "ObjectMeta"),
        ("data", 2, "map", True, _STRING),
        ("binaryData", 3, "map", True, _BYTES),
        ("immutable", 4, _BOOL, False, None),
    ],
}
#: Kinds this module reads: (apiVersion, kind).
KINDS: Final = frozenset({("v1", "Secret"), ("v1", "ConfigMap")})


class UnreadableBody(ValueError):
    """A protobuf body this module does not read (not Kubernetes', another kind, or a
    field outside the declared part)."""


def _file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="virtbackup_kube.proto", package=_PACKAGE, syntax="proto2"
    )
    for name, fields in _SCHEMA.items():
        message = file.message_type.add(name=name)
        for field, number, kind, repeated, extra in fields:
            if kind == "map":
                entry = message.nested_type.add(name=f"{field[0].upper()}{field[1:]}Entry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, type=_STRING, label=_OPTIONAL)
                entry.field.add(name="value", number=2, type=extra, label=_OPTIONAL)
                message.field.add(
                    name=field,
                    number=number,
                    label=_REPEATED,
                    type=_MESSAGE,
                    type_name=f".{_PACKAGE}.{name}.{entry.name}",
                    json_name=field,
                )
                continue
            added = message.field.add(
                name=field,
                number=number,
                label=_REPEATED if repeated else _OPTIONAL,
                type=kind,
                json_name=field,
            )
            if kind == _MESSAGE:
                added.type_name = f".{_PACKAGE}.{extra}"
    return file


_POOL: Final = descriptor_pool.DescriptorPool()
_POOL.Add(_file())
_CLASSES: Final = {
    name: message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
    for name in _SCHEMA
}


def _has_unknown(message: Any) -> bool:
    if len(unknown_fields.UnknownFieldSet(message)):
        return True
    return any(
        _has_unknown(value)
        for field, value in message.ListFields()
        if field.message_type is not None
        and not field.message_type.GetOptions().map_entry
        and not field.is_repeated
    )


def _json(message: Any) -> dict[str, Any]:
    """The JSON form of a message of :data:`_SCHEMA`: bytes base64, int64 numbers, Time
    RFC 3339, maps objects. Go's encoder writes every non-pointer field, empty or not;
    its JSON leaves empty strings, zero numbers and zero times out (``omitempty``), and
    so does this."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.type in (_STRING, _INT64, _INT32) and not field.is_repeated and not value:
            continue
        if field.message_type is not None and field.message_type.name == "Time":
            if value.seconds or value.nanos:
                out[field.name] = datetime.fromtimestamp(value.seconds, UTC).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"
                )
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            bytes_values = field.message_type.fields_by_name["value"].type == _BYTES
            out[field.name] = {
                k: base64.b64encode(v).decode() if bytes_values else v for k, v in value.items()
            }
        elif field.message_type is not None:
            out[field.name] = _json(value)
        elif field.type == _BYTES:
            out[field.name] = base64.b64encode(value).decode()
        elif field.is_repeated:
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


def read(body: bytes) -> dict[str, Any]:
    """The object a protobuf ``body`` carries, as its JSON encoding would be (``apiVersion``
    and ``kind`` included). Raises :class:`UnreadableBody` for anything but a Secret or
    ConfigMap within the declared fields."""
    if not body.startswith(MAGIC):
        raise UnreadableBody("not Kubernetes' protobuf encoding (no k8s magic)")
    try:
        envelope = _CLASSES["Unknown"].FromString(body[len(MAGIC) :])
    except Exception as exc:
        raise UnreadableBody(f"not a runtime.Unknown: {exc}") from exc
    api_version, kind = envelope.typeMeta.apiVersion, envelope.typeMeta.kind
    if (api_version, kind) not in KINDS or envelope.contentEncoding:
        raise UnreadableBody(f"{api_version} {kind} (encoding {envelope.contentEncoding!r})")
    try:
        obj = _CLASSES[kind].FromString(envelope.raw)
    except Exception as exc:
        raise UnreadableBody(f"not a {kind}: {exc}") from exc
    if _has_unknown(obj):
        raise UnreadableBody(f"{kind} with fields this stand-in does not read")
    return {"apiVersion": api_version, "kind": kind, **_json(obj)}
