"""msgpack encoding derived from the protocol's dataclasses: no pickle, no hand-kept field lists.

A message is `[class name, field, field, ...]` in the dataclass's field order. Each field is
encoded by its type hint: plain values as themselves, nested dataclasses as lists, lists and
dicts element by element, and arrays (`Int32Array`, `Float32Array`) as one msgpack extension of
little-endian bytes, which decodes straight into a numpy view with no per-element Python work.

Decoding checks every field against its type hint and raises ValueError naming the message, the
field and what was wrong, so a receiver can drop a malformed or hostile frame and carry on. A
dataclass's own `__post_init__` checks (SamplingParams' ranges, say) run on decode too.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Callable, Union

import msgpack
import numpy as np


class _ArrayType:
    """A type hint for a 1-D numpy array of one dtype, carried as one msgpack extension."""

    def __init__(self, name: str, dtype: str, code: int) -> None:
        self.__name__, self.dtype, self.code = name, np.dtype(dtype), code

    def __repr__(self) -> str:
        return self.__name__


Int32Array = _ArrayType("Int32Array", "<i4", 1)
Float32Array = _ArrayType("Float32Array", "<f4", 2)
_ARRAYS = {a.code: a for a in (Int32Array, Float32Array)}

_Encoder = Callable[[Any], Any]
_Decoder = Callable[[Any, str], Any]


def encode(message: Any) -> bytes:
    """One protocol dataclass instance -> bytes."""
    cls = type(message)
    return msgpack.packb([cls.__name__, *_dataclass_encoder(cls)(message)], use_bin_type=True)


def decode(data: bytes, *expected: type) -> Any:
    """bytes -> an instance of one of the `expected` dataclasses, checked field by field.

    Raises ValueError for anything else: bytes that are not msgpack, another message, a missing
    or extra field, a field of the wrong type, an out-of-range value.
    """
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as e:  # msgpack raises several types for truncated or bad data
        raise ValueError(f"malformed message ({len(data)} bytes): {type(e).__name__}: {e}") from None
    names = {cls.__name__: cls for cls in expected}
    if not (isinstance(msg, list) and msg and isinstance(msg[0], str) and msg[0] in names):
        head = msg[0] if isinstance(msg, list) and msg else type(msg).__name__
        raise ValueError(f"malformed message: expected {' or '.join(names)}, got {head!r:.60}")
    cls = names[msg[0]]
    return _dataclass_decoder(cls)(msg[1:], cls.__name__)


# -- encoders ------------------------------------------------------------------------------------

def _identity(value: Any) -> Any:
    return value


@functools.cache
def _dataclass_encoder(cls: type) -> Callable[[Any], list]:
    fields = [(f.name, _encoder_for(hint)) for f, hint in _fields(cls)]

    def encode_fields(obj: Any) -> list:
        return [enc(getattr(obj, name)) for name, enc in fields]
    return encode_fields


def _encoder_for(hint: Any) -> _Encoder:
    if isinstance(hint, _ArrayType):
        dtype, code = hint.dtype, hint.code
        return lambda v: msgpack.ExtType(code, np.ascontiguousarray(v, dtype=dtype).tobytes())
    if dataclasses.is_dataclass(hint):
        return _dataclass_encoder(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if all(_is_plain(a) for a in options):
            return _identity
        encoders = [(_runtime_type(a), _encoder_for(a)) for a in options]
        return lambda v: v if v is None else next(enc for t, enc in encoders if isinstance(v, t))(v)
    if origin is list:
        item = _encoder_for(args[0])
        return _identity if item is _identity else (lambda v: [item(x) for x in v])
    if origin is dict:
        key, value = _encoder_for(args[0]), _encoder_for(args[1])
        return lambda v: {key(k): value(x) for k, x in v.items()}
    return _identity


def _is_plain(hint: Any) -> bool:
    if hint in (int, float, str, bool, bytes, Any, type(None)):
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    return origin in (list, dict, Union, types.UnionType) and all(_is_plain(a) for a in args)


def _runtime_type(hint: Any) -> type:
    if isinstance(hint, _ArrayType):
        return (np.ndarray, list)
    return typing.get_origin(hint) or hint


# -- decoders ------------------------------------------------------------------------------------

def _fail(where: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"malformed message: {where} must be {expected}, got {type(value).__name__} "
                      f"{value!r:.60}")


@functools.cache
def _dataclass_decoder(cls: type) -> Callable[[Any, str], Any]:
    fields = [(f.name, _decoder_for(hint)) for f, hint in _fields(cls)]
    count = len(fields)

    def decode_fields(values: Any, where: str) -> Any:
        if not isinstance(values, list) or len(values) != count:
            raise _fail(where, f"a list of {count} fields", values)
        decoded = [dec(v, f"{where}.{name}") for (name, dec), v in zip(fields, values)]
        try:
            return cls(*decoded)
        except (TypeError, OverflowError, ValueError) as e:  # __post_init__ rejecting a value
            raise ValueError(f"malformed message: {where}: {e}") from None
    return decode_fields


def _decoder_for(hint: Any) -> _Decoder:
    if isinstance(hint, _ArrayType):
        return functools.partial(_decode_array, hint)
    if dataclasses.is_dataclass(hint):
        return _dataclass_decoder(hint)
    if hint in _SCALARS:
        return _SCALARS[hint]
    if hint is Any:
        return lambda v, where: v
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return _union_decoder(args)
    if origin is list:
        return _list_decoder(args[0])
    if origin is dict:
        key, value = _decoder_for(args[0]), _decoder_for(args[1])

        def decode_dict(v: Any, where: str) -> dict:
            if not isinstance(v, dict):
                raise _fail(where, "a map", v)
            return {key(k, where + " key"): value(x, f"{where}[{k!r:.20}]") for k, x in v.items()}
        return decode_dict
    raise TypeError(f"codec: unsupported type hint {hint!r}")


def _decode_array(kind: _ArrayType, v: Any, where: str) -> np.ndarray:
    if not isinstance(v, msgpack.ExtType) or v.code != kind.code or len(v.data) % kind.dtype.itemsize:
        raise _fail(where, kind.__name__, v)
    return np.frombuffer(v.data, dtype=kind.dtype)


def _scalar(kind: type, name: str) -> _Decoder:
    def decode_scalar(v: Any, where: str) -> Any:
        if type(v) is kind:
            return v
        if kind is float and type(v) is int:
            return float(v)
        raise _fail(where, name, v)
    return decode_scalar


_SCALARS: dict[Any, _Decoder] = {int: _scalar(int, "an integer"), float: _scalar(float, "a number"),
                                 str: _scalar(str, "a string"), bool: _scalar(bool, "a boolean"),
                                 bytes: _scalar(bytes, "bytes")}


def _list_decoder(item_hint: Any) -> _Decoder:
    item = _decoder_for(item_hint)
    if item_hint in (int, str, bool):  # the common case: one type check per element, in C
        def decode_plain_list(v: Any, where: str) -> list:
            if not isinstance(v, list) or not all(type(x) is item_hint for x in v):
                raise _fail(where, f"a list of {item_hint.__name__}", v)
            return v
        return decode_plain_list

    def decode_list(v: Any, where: str) -> list:
        if not isinstance(v, list):
            raise _fail(where, "a list", v)
        return [item(x, f"{where}[{i}]") for i, x in enumerate(v)]
    return decode_list


def _union_decoder(args: tuple) -> _Decoder:
    optional = type(None) in args
    options = [_decoder_for(a) for a in args if a is not type(None)]

    def decode_union(v: Any, where: str) -> Any:
        if v is None and optional:
            return None
        errors = []
        for dec in options:
            try:
                return dec(v, where)
            except ValueError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise ValueError(errors[0])
        raise _fail(where, " or ".join(getattr(a, "__name__", str(a)) for a in args), v)
    return decode_union


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]
