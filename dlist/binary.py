"""The binary form of DLIST values and lines, for modsync's own protocol and files.

It is the node tree of dlist.model written with msgpack, so encoding and
decoding run entirely in msgpack's C extension with no per-node Python work,
and converting between text and binary is lossless in both directions
(text -> model -> binary -> model -> text is byte-identical).

Format, version 1 (one msgpack array; tuples are arrays, tokens are bin)::

    value:  [1, 0, node]
    line:   [1, 1, verb, key, value, text]   verb and text are bin or nil;
                                             key and value are nodes or nil
    node:   bin                              a token exactly as on the wire
          | [1, node...]                     list
          | [2, key, node, key, node...]     kvlist (a key is a token or a literal)
          | [3, bin]                         literal
          | [4, partition, guid, size, body, bare_lf]
                                             file literal; body is bin, or nil
                                             when carried by reference

The leading version number changes whenever this layout does; a decoder
refuses versions it does not know.  ``files="ref"`` leaves file bodies out
(partition, GUID and size stay), for protocols that ship bodies separately.

Decoding checks the envelope and the top node; deeper nodes are checked when
used: accessors and the printer raise DlistProtocolError on anything
malformed, so a hostile blob can neither crash the reader nor smuggle bad
syntax into DLIST text.
"""
from __future__ import annotations

import gc
from typing import Any

import msgpack

from .errors import DlistProtocolError
from .model import FILE, KVLIST, LIST, Line, Value, decode_text, wrap

FORMAT_VERSION = 1

_VALUE = 0
_LINE = 1

# Blobs this big are decoded with the cyclic GC paused: it would otherwise
# traverse the tuples being built over and over (a threefold slowdown on a
# 20,000-record mailbox); the result holds no reference cycles.
_GC_PAUSE_BYTES = 64 * 1024


def _strip_bodies(node: Any) -> Any:
    """``node`` with every file literal's body left out."""
    if type(node) is not tuple or not node:
        return node
    tag = node[0]
    if tag == FILE:
        return node[:4] + (None,) + node[5:]
    if tag != LIST and tag != KVLIST:
        return node
    items = node[1:]
    if not any(type(x) is tuple for x in items):
        return node
    return (tag, *map(_strip_bodies, items))


def _payload(node: Any, files: str) -> Any:
    if files == "inline":
        return node
    if files == "ref":
        return _strip_bodies(node)
    raise ValueError(f"files must be 'inline' or 'ref', not {files!r}")


def encode_value(value: Value, *, files: str = "inline") -> bytes:
    """The binary form of one value; ``files="ref"`` leaves file bodies out."""
    if not isinstance(value, Value):
        raise TypeError(f"expected a dlist Value, got {type(value).__name__}")
    return msgpack.packb((FORMAT_VERSION, _VALUE, _payload(value.node, files)))


def encode_line(line: Line, *, files: str = "inline") -> bytes:
    """The binary form of one line; ``files="ref"`` leaves file bodies out."""
    verb = line.verb.encode("utf-8", "surrogateescape")
    value = None if line.value is None else _payload(line.value.node, files)
    return msgpack.packb((FORMAT_VERSION, _LINE, verb, line.key_node, value, line.text))


def _unpack(data: bytes, kind: int) -> tuple:
    pause = len(data) >= _GC_PAUSE_BYTES and gc.isenabled()
    if pause:
        gc.disable()
    try:
        # Only bin, arrays, ints, nil and booleans occur in the format: str,
        # maps and extension types are refused by msgpack itself.
        obj = msgpack.unpackb(data, use_list=False, raw=False, max_str_len=0, max_map_len=0,
                              max_ext_len=0)
    except (ValueError, msgpack.UnpackException) as e:  # msgpack's ways of saying "malformed"
        raise DlistProtocolError(f"not a DLIST binary blob ({e})", expected="msgpack data") from None
    finally:
        if pause:
            gc.enable()
    if type(obj) is not tuple or len(obj) < 2 or type(obj[0]) is not int:
        raise DlistProtocolError("not a DLIST binary blob", expected="[version, kind, ...]")
    if obj[0] != FORMAT_VERSION:
        raise DlistProtocolError(f"binary format version {obj[0]} is not supported",
                                 expected=f"version {FORMAT_VERSION}")
    if obj[1] != kind:
        raise DlistProtocolError("wrong kind of DLIST blob",
                                 expected="a line" if kind == _LINE else "a value")
    return obj


def decode_value(data: bytes) -> Value:
    """The value in a blob made by :func:`encode_value`."""
    obj = _unpack(data, _VALUE)
    if len(obj) != 3:
        raise DlistProtocolError("malformed value blob", expected="[version, 0, node]")
    return wrap(obj[2])


def decode_line(data: bytes) -> Line:
    """The line in a blob made by :func:`encode_line`."""
    obj = _unpack(data, _LINE)
    if len(obj) != 6:
        raise DlistProtocolError("malformed line blob", expected="[version, 1, verb, key, value, text]")
    _, _, verb, key, value, text = obj
    if type(verb) is not bytes or (text is not None and type(text) is not bytes):
        raise DlistProtocolError("malformed line blob", expected="bin verb and text")
    if (key is None) != (value is None) or (key is not None and text is not None):
        raise DlistProtocolError("malformed line blob", expected="either key and value, or text")
    if key is not None:
        wrap(key)
    return Line._make(decode_text(verb), key, value, text)
