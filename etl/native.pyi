from typing import Any

def encode_rows(columns: list[tuple[Any, Any]]) -> bytes: ...
def read_records(
    buf: bytes,
    pos: int,
    count: int,
    topic: str,
    partition: int,
    base_offset: int,
    first_timestamp: int,
    log_append_time: int | None,
    record_type: type,
) -> tuple[list[Any], int] | None: ...
def plain(
    payloads: list[Any],
) -> tuple[bytes, list[Any], list[Any], bytes, bytes, bytes, bytes, list[Any], list[Any], bytes]: ...
def fields(messages: list[Any]) -> tuple[bytearray, bytearray, bytearray, str | None, bool]: ...
