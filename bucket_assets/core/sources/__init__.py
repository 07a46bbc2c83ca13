"""Input sources: each reader turns one spec source into RawRecords without decoding images.

A record says where its image bytes are (file, or tar + data offset) and carries the source's
own caption and metadata. Reading the bytes and probing the header happens later, in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from bucket_assets.spec import FolderSource, ParquetSource, Source, UrlSource, WebDatasetSource


@dataclass
class RawRecord:
    image_id: str
    source: str
    location: str | None  # image file, or the tar that holds it
    member: str | None = None  # tar member name
    offset: int | None = None  # data offset in an uncompressed tar
    size: int | None = None
    caption: str | None = None
    caption_field: str | None = None
    url: str | None = None
    similarity: float | None = None
    nsfw: str | None = None
    license: str | None = None
    orig_w: int | None = None  # the source's claimed original size (LAION json, parquet columns)
    orig_h: int | None = None
    meta: dict | None = None  # the source's own metadata record (LAION json, parquet row)
    issue: str | None = None  # a reason known at scan time (missing_file, missing_image, ...)
    issue_detail: str | None = None
    notes: list[str] = field(default_factory=list)  # non-fatal flags (invalid_similarity, ...)


@dataclass
class ScanStats:
    """Things a scan skipped that are not records of their own (unsafe tar members, ...)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n


def scan_source(source: Source, stats: ScanStats, max_caption_chars: int, downloads: dict[str, dict] | None = None,
                download_store: str | None = None) -> Iterator[RawRecord]:
    """`downloads` (image_id -> url_downloads row) and `download_store` locate a URL source's
    fetched bytes."""
    from bucket_assets.core.sources import folder, parquet, urls, webdataset

    if isinstance(source, WebDatasetSource):
        yield from webdataset.scan(source, stats, max_caption_chars)
    elif isinstance(source, ParquetSource):
        yield from parquet.scan(source, stats, max_caption_chars)
    elif isinstance(source, FolderSource):
        yield from folder.scan(source, stats, max_caption_chars)
    elif isinstance(source, UrlSource):
        yield from urls.scan(source, stats, max_caption_chars, downloads or {}, str(download_store))
    else:  # pragma: no cover - the spec's discriminator makes this unreachable
        raise TypeError(f"unknown source kind {source!r}")


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def read_bytes(location: str, member: str | None, offset: int | None, size: int | None) -> bytes:
    """The image bytes of a record: a plain file, a seek into an uncompressed tar, or a tar member."""
    if member is None:
        with open(location, "rb") as f:
            return f.read()
    with open(location, "rb") as f:
        compressed = f.read(6).startswith(_COMPRESSED_MAGIC)
        if offset is not None and size is not None and not compressed:
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise OSError(f"{location}: member {member} is truncated ({len(data)} of {size} bytes)")
            return data
    import tarfile

    # A compressed tar is read through: the member is found by name and by its offset in the
    # decompressed stream, since a name can repeat (the scan keeps the first).
    try:
        with tarfile.open(location, "r:*") as tf:
            for m in tf:
                if m.name == member and (offset is None or m.offset_data == offset):
                    if not m.isfile():
                        raise OSError(f"{location}: member {member} is not a regular file")
                    return tf.extractfile(m).read()
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - tarfile, gzip, bz2 and lzma each raise their own errors
        raise OSError(f"{location}: cannot read member {member}: {type(exc).__name__}: {exc}") from None
    raise OSError(f"{location}: member {member} not found")
