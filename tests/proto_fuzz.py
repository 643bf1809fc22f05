"""Hypothesis strategies that build random protobuf messages from their descriptors.

Every field of a message may be set or left alone; values lean towards the
edges (empty, huge, negative, NaN, unknown enum numbers, deep nesting), so most
messages built are invalid in some way, and some are valid. Nothing here knows
treadle's rules: the descriptors alone decide the shape.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

F = FieldDescriptor

_INT_RANGES: dict[int, tuple[int, int]] = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}

# Small values are where the valid requests are; the extremes are where the bugs are.
_HUGE_TEXT = st.builds(lambda c, n: c * n, st.characters(), st.integers(1_000, 70_000))
_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "user", "assistant", "{}", "[]", '{"a":', "\ud7ff" * 3]),
    st.text(max_size=8),
    st.sampled_from(["hello", "stop", "system", "a b c"]),
    _HUGE_TEXT,
)


def _int(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [v for v in (lo, hi, 0, 1, 2, -1, 8, 64, 4096, 49151, 49152) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(max(lo, -100), min(hi, 100000)))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_RANGES:
        return _int(*_INT_RANGES[t])
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        width = 32 if t == F.TYPE_FLOAT else 64
        return st.one_of(
            st.floats(width=width),  # NaN, infinities and subnormals included
            st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0, 1e30]),
        )
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return _TEXT
    if t == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == F.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 1000))
    raise TypeError(f"no strategy for field type {t} ({field.full_name})")


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def messages(descriptor: Descriptor, depth: int = 3, set_one_in: int = 2) -> st.SearchStrategy[Any]:
    """Random messages of the type `descriptor` describes, nested at most `depth` deep.

    Each field outside a oneof is set with probability 1/`set_one_in` (a larger
    value keeps messages sparse, for mutating a valid one with `MergeFrom`).
    """

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = GetMessageClass(descriptor)()
        chosen_oneofs = {
            o.name: draw(st.sampled_from([None, *(f.name for f in o.fields)]))
            for o in descriptor.oneofs
        }
        for field in descriptor.fields:
            oneof = field.containing_oneof
            if oneof is not None and chosen_oneofs[oneof.name] != field.name:
                continue
            if oneof is None and draw(st.integers(0, set_one_in - 1)) != 0:
                continue
            _set(draw, msg, field, depth, set_one_in)
        return msg

    return build()


def _set(
    draw: st.DrawFn, msg: Message, field: FieldDescriptor, depth: int, set_one_in: int
) -> None:
    if _is_map(field):
        key_f = field.message_type.fields_by_name["key"]
        value_f = field.message_type.fields_by_name["value"]
        entries = draw(st.dictionaries(_scalar(key_f), _scalar(value_f), max_size=8))
        getattr(msg, field.name).update(entries)
        return
    if field.message_type is not None:
        if depth <= 0:
            return
        sub = messages(field.message_type, depth - 1, set_one_in)
        if _repeated(field):
            for item in draw(st.lists(sub, max_size=4)):
                getattr(msg, field.name).add().CopyFrom(item)
        else:
            getattr(msg, field.name).CopyFrom(draw(sub))
        return
    if _repeated(field):
        size = draw(st.sampled_from([0, 1, 3, 20, 5000]))
        getattr(msg, field.name).extend(draw(st.lists(_scalar(field), min_size=min(size, 3))))
        if size > 20:  # a long list of one value: cheap to build, costly if not capped
            getattr(msg, field.name).extend([draw(_scalar(field))] * size)
        return
    setattr(msg, field.name, draw(_scalar(field)))


def field_names(descriptor: Descriptor, seen: set[str] | None = None) -> set[str]:
    """Every field name reachable from `descriptor` (for "the message names a field")."""
    seen = set() if seen is None else seen
    names: set[str] = set()
    if descriptor.full_name in seen:
        return names
    seen.add(descriptor.full_name)
    for field in descriptor.fields:
        names.add(field.name)
        if field.message_type is not None:
            names |= field_names(field.message_type, seen)
    return names
