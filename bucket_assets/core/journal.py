"""Append-only JSONL journals: one row per finished item, written as the work happens, so a
killed run resumes from what is already done. Rows are not fsynced (they guard against a killed
process, which the kernel survives); a line torn by a kill is skipped when read back."""

from __future__ import annotations

import itertools
import json
import os
from typing import IO, Iterator

import pyarrow as pa


def append_row(f: IO[str], row: dict) -> None:
    f.write(json.dumps(row, sort_keys=True) + "\n")
    f.flush()


def read_rows(path: str | os.PathLike) -> Iterator[dict]:
    """The journal's complete rows (JSON objects) in order; none if it does not exist."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield row


def read_batches(path: str | os.PathLike, size: int) -> Iterator[list[dict]]:
    """read_rows in lists of at most `size` rows: a journal as long as a dataset is loaded
    without holding it whole."""
    rows = read_rows(path)
    while batch := list(itertools.islice(rows, size)):
        yield batch


def rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Journal rows as a table of `schema`; a row that does not fit it (a line from another
    version, say) is left out, so its item is done again."""
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowException, TypeError, ValueError):
        ok = []
        for r in rows:
            try:
                pa.Table.from_pylist([r], schema=schema)
            except (pa.ArrowException, TypeError, ValueError):
                continue
            ok.append(r)
        return pa.Table.from_pylist(ok, schema=schema)
