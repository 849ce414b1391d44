"""How ``metric-etl rejects`` shows a reject to a person: the table of ``rejects list``, the full view
of ``rejects show`` (hex dump, escaped text), terminal-safe: every character a terminal could act on
is escaped. Pure functions of a reject's fields; no database here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

HEX_LIMIT = 4096  # bytes shown by `rejects show`; the export has them all


def reject_text(x: Any, *, hex_dump: bool = False) -> str:
    """Everything about a reject (an :class:`etl.ops.rejects.Reject`), safe to print: control
    characters are escaped, bytes that are not text are shown as a hex dump."""
    lines = [
        f"reject {x.id}: status {x.status}, stage {x.stage}, rejected {iso(x.rejected_at)} by run {x.run_id}",
    ]
    if x.status_note or x.status_changed_at:
        lines.append(f"  note:      {escape(x.status_note or '-')} ({iso(x.status_changed_at) or '-'})")
    lines += [
        f"  kafka:     topic {escape(x.topic)}, partition {x.partition}, offset {x.offset}, "
        f"timestamp {iso(x.kafka_timestamp) or '-'}",
        f"  key:       {_show_bytes(x.key)}",
        f"  headers:   {_show_headers(x.headers)}",
        f"  errors ({len(x.errors)}):",
    ]
    for e in x.errors:
        where = e.get("field") or "(message)"
        value = e.get("value")
        shown = "" if value is None else f"  value: {escape(str(value), keep_newlines=False)}"
        lines.append(f"    - {escape(str(where))}: {escape(str(e.get('rule')))}{shown}")
    if x.payload is None:
        lines.append("  payload:   none (a tombstone)")
    else:
        text = _text_or_none(x.payload)
        kind = "UTF-8 text" if text is not None else "not UTF-8"
        lines.append(f"  payload:   {len(x.payload)} bytes, {kind}")
        if text is not None and not hex_dump and _is_plain(text):
            lines += ["    " + line for line in text.splitlines() or [""]]
        else:
            lines += ["    " + line for line in hexdump(x.payload[:HEX_LIMIT])]
            if len(x.payload) > HEX_LIMIT:
                lines.append(f"    ... {len(x.payload) - HEX_LIMIT} more bytes (see `rejects export`)")
            if text is not None:
                lines.append("  decoded text (escaped):")
                lines += ["    " + line for line in escape(text).splitlines() or [""]]
    return "\n".join(lines)


def preview(payload: bytes | None, width: int = 40) -> str:
    """A payload in one short, terminal-safe line."""
    if payload is None:
        return "(tombstone: no value)"
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        head = payload[:12].hex(" ")
        return cut(f"<{len(payload)} bytes, not UTF-8: {head}>", width)
    if not text:
        return "(empty)"
    return cut(escape(text, keep_newlines=False), width)


def format_table(rejects: Iterable[Any], *, width: int = 120) -> str:
    """A readable table, one line per reject (:class:`etl.ops.rejects.Reject`; terminal-safe)."""
    items = list(rejects)
    header = ("id", "rejected (UTC)", "topic:partition:offset", "stage", "status", "rules", "payload")
    rows = [
        (
            str(x.id),
            f"{x.rejected_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}",
            f"{escape(x.topic)}:{x.partition}:{x.offset}",
            x.stage,
            x.status,
            cut(", ".join(escape(rule) for rule in x.rules), 32),
            "",
        )
        for x in items
    ]
    if not rows:
        return "no rejects match"
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(6)]
    room = max(width - sum(widths) - 2 * 6, 20)
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, [*widths, 0], strict=True)).rstrip()]
    for row, x in zip(rows, items, strict=True):
        cells = [row[0].rjust(widths[0]), *(c.ljust(w) for c, w in zip(row[1:6], widths[1:], strict=True))]
        lines.append("  ".join([*cells, preview(x.payload, room)]))
    return "\n".join(lines)


def escape(text: str, *, keep_newlines: bool = True) -> str:
    """``text`` with every character a terminal could act on escaped (control, format, bidi...)."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or (keep_newlines and ch in "\n\t"):
            out.append(ch)
        else:
            code = ord(ch)
            out.append(
                f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
            )
    return "".join(out)


def hexdump(data: bytes) -> list[str]:
    """``xxd``-style lines: offset, 16 bytes in hex, the printable ASCII."""
    lines = []
    for at in range(0, len(data), 16):
        chunk = data[at : at + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk[:8]) + "  " + " ".join(f"{b:02x}" for b in chunk[8:])
        ascii_ = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{at:08x}  {hexes:<48}  |{ascii_}|")
    return lines or ["(0 bytes)"]


def _is_plain(text: str) -> bool:
    return all(ch.isprintable() or ch in "\n\t" for ch in text)


def _text_or_none(data: bytes) -> str | None:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def _show_bytes(data: bytes | None) -> str:
    if data is None:
        return "none"
    text = _text_or_none(data)
    if text is not None and _is_plain(text) and "\n" not in text:
        return cut(json.dumps(text, ensure_ascii=False), 200)
    return f"{len(data)} bytes: {cut(data.hex(' '), 200)}"


def _show_headers(headers: list[Any] | None) -> str:
    if not headers:
        return "none"
    return escape(json.dumps(headers, ensure_ascii=False), keep_newlines=False)


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
