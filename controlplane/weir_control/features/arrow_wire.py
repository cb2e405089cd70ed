"""Arrow tables over gRPC: each message carries one complete Arrow IPC stream, sized to stay well
under gRPC's message limit (4 MiB by default on the receiving side), so either end can decode a
message on its own and stream the rest."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow as pa

from weir_proto.errors import InvalidArgumentError, ResourceExhaustedError

MESSAGE_BYTES = 2 * 1024 * 1024  # target payload per message; a single huge row may exceed it
# A request's table (entity rows, pushed rows), decoded, at most: a client stream cannot grow the control
# plane without bound, however many messages it sends.
MAX_TABLE_BYTES = 512 * 1024 * 1024


def encode_batches(
    batches: Iterable[pa.RecordBatch], message_bytes: int = MESSAGE_BYTES
) -> Iterator[tuple[bytes, int]]:
    """(IPC stream bytes, rows) per message, splitting batches by their average row size."""
    for batch in batches:
        if batch.num_rows == 0:
            continue
        row_bytes = max(1, batch.nbytes // batch.num_rows)
        step = max(1, message_bytes // row_bytes)
        for offset in range(0, batch.num_rows, step):
            piece = batch.slice(offset, step)  # a view: no copy until serialised
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, piece.schema) as writer:
                writer.write_batch(piece)
            yield sink.getvalue().to_pybytes(), piece.num_rows


def encode_table(table: pa.Table, message_bytes: int = MESSAGE_BYTES) -> Iterator[tuple[bytes, int]]:
    yield from encode_batches(table.to_batches(), message_bytes)


def decode(payload: bytes, field: str, budget: int = MAX_TABLE_BYTES) -> pa.Table:
    """One message's IPC stream; an unreadable one is the caller's bad input, named by ``field``. Read
    batch by batch: past ``budget`` decoded bytes it stops with RESOURCE_EXHAUSTED."""
    try:
        reader = pa.ipc.open_stream(payload)
        batches, size = [], 0
        for batch in reader:
            size += batch.nbytes
            if size > budget:
                raise ResourceExhaustedError(
                    f"{field}: expected at most {MAX_TABLE_BYTES // 2**20} MiB of Arrow data per request, got more"
                )
            batches.append(batch)
        return pa.Table.from_batches(batches, schema=reader.schema)
    except (pa.ArrowInvalid, OSError) as error:
        raise InvalidArgumentError(
            f"{field}: expected an Arrow IPC stream, got {len(payload)} unreadable bytes ({error})"
        ) from error


def concat(tables: list[pa.Table], field: str) -> pa.Table:
    if not tables:
        raise InvalidArgumentError(f"{field}: expected at least one Arrow IPC message with rows, got none")
    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid as error:
        raise InvalidArgumentError(f"{field}: the messages' schemas differ: {error}") from error
