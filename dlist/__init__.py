"""DLIST, the data format of Cyrus IMAP replication, compatible with Cyrus 3.6.

A codec with no I/O: bytes in, values out, and back.  Three parts:

**Values** (:mod:`dlist.model`).  A value keeps the form the wire gave it, so
what is parsed prints back byte-identical; values built in code take the form
Cyrus's printer would choose.

* ``NIL``; ``Str(x)`` (atom, quoted string or literal, chosen like Cyrus);
  ``Atom``, ``Quoted``, ``Literal`` (a given form); ``Num(n)``, ``Hex(n)``,
  ``Guid(s)`` (numbers and GUIDs, atoms on the wire); ``Flag("\\\\Seen")``;
  ``File(partition, guid, size=None, body=None)`` for ``%{p g n}`` literals;
  ``List(items)``; ``KvList(pairs, **fields)`` (alias ``kvlist``).  Plain
  Python data converts too: ``str``/``bytes`` -> Str, ``int`` -> Num,
  ``None`` -> NIL, ``list``/``tuple`` -> List, ``dict`` -> KvList.
* Conversions work like Cyrus's ``dlist_get*``: ``value.as_atom()``,
  ``as_map()``, ``as_num()``, ``as_num32()``, ``as_date()``, ``as_hex()``,
  ``as_guid()``; on a KvList ``kv.get_atom(key)``, ``get_map``, ``get_num``,
  ``get_num32``, ``get_date``, ``get_hex``, ``get_guid``, ``get_list``,
  ``get_kvlist``, ``get_file`` (pass ``default=`` for optional keys).
  ``kv[key]``, ``kv.get(key)``, ``keys()``, ``items()`` keep order and
  unknown or duplicate keys; ``List`` is a sequence and has ``atoms()``.
* ``Line(verb, key, value)`` or ``Line(verb, text=...)``: one protocol line,
  e.g. ``Line("APPLY", "MAILBOX", KvList(UNIQUEID=u, MBOXNAME=n, RECORD=[...]))``
  or ``Line("OK", text="success")``.

**Text** (:mod:`dlist.parser`, :mod:`dlist.printer`).

* ``Parser(limits=Limits(), sink=None, banner=False)``: ``feed(data)``,
  ``feed_eof()``, ``next_line() -> Line | None``.  File literal bodies stream
  into ``sink(partition, guid, size)`` objects (:mod:`dlist.sinks`) and are
  checked against their GUID (``Line.corrupt_files``).
* ``print_line(line, role="client"|"server", bodies=None) -> bytes``,
  ``iter_line(...)`` (streams file bodies), ``print_value(value, role)``.
  The role decides ``{n+}`` (client) or ``{n}`` (server) literal headers.

**Binary** (:mod:`dlist.binary`): msgpack of the same model, versioned,
lossless to and from text, file bodies inline or by reference:
``encode_line(line, files="inline"|"ref")``, ``decode_line(data)``,
``encode_value``, ``decode_value``.

Every malformed input raises :class:`DlistProtocolError` (with the byte
offset in the stream where there is one); limits are in :mod:`dlist.limits`.
"""
from __future__ import annotations

from .binary import FORMAT_VERSION, decode_line, decode_value, encode_line, encode_value
from .errors import DlistProtocolError
from .limits import DEFAULT_LIMITS, Limits
from .model import (
    NIL,
    Atom,
    File,
    Flag,
    Guid,
    Hex,
    KvList,
    Line,
    List,
    Literal,
    Nil,
    Num,
    Quoted,
    Str,
    Value,
    kvlist,
)
from .parser import Parser
from .printer import iter_line, print_line, print_value
from .sinks import BodySink, MemorySink, SinkFactory

__all__ = [
    "DEFAULT_LIMITS", "FORMAT_VERSION", "NIL", "Atom", "BodySink", "DlistProtocolError", "File",
    "Flag", "Guid", "Hex", "KvList", "Limits", "Line", "List", "Literal", "MemorySink", "Nil",
    "Num", "Parser", "Quoted", "SinkFactory", "Str", "Value", "decode_line", "decode_value",
    "encode_line", "encode_value", "iter_line", "kvlist", "print_line", "print_value",
]
