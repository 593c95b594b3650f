"""Files (OpenAI Files API): content is streamed in and out in chunks, never held whole.

A file is written as a row in ``uploading`` status, then its chunks, each in its own short
transaction (a slow upload never holds a long write lock), then marked ``uploaded`` with its size
and line count. A failed upload leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import BinaryIO

from sqlalchemy import delete, func, insert, select, update

from store.db import Database
from store.errors import NotFound
from store.models import File, FileChunk, Tenant
from store.sql import new_id, utcnow

CHUNK_BYTES = 1 << 20
MAX_LINE_BYTES = 16 << 20


def _rechunk(content: BinaryIO | Iterable[bytes], size: int) -> Iterator[bytes]:
    """Yields pieces of exactly ``size`` bytes (the last one shorter) from a stream or iterable."""
    read = getattr(content, "read", None)
    if read is not None:
        while piece := read(size):
            yield piece
        return
    pending: list[bytes] = []
    held = 0
    for part in content:  # type: ignore[union-attr]
        if isinstance(part, str):
            part = part.encode("utf-8")
        pending.append(part)
        held += len(part)
        while held >= size:
            joined = b"".join(pending)
            yield joined[:size]
            rest = joined[size:]
            pending, held = ([rest] if rest else []), len(rest)
    if held:
        yield b"".join(pending)


class FileStore:
    """Files and their content."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(
        self,
        tenant_id: str,
        content: BinaryIO | Iterable[bytes],
        *,
        purpose: str,
        filename: str,
        max_bytes: int | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> File:
        """Stores a file from a binary stream (anything with ``read``) or an iterable of bytes.

        Memory stays around ``chunk_bytes`` whatever the file's size. Raises NotFound for an unknown
        tenant, ValueError if the content exceeds ``max_bytes`` (the partial file is removed).
        """
        if not purpose:
            raise ValueError("a file needs a purpose (e.g. 'batch')")
        file = File(
            id=new_id("file-"),
            tenant_id=tenant_id,
            purpose=purpose,
            filename=filename[:255] or "file",
            bytes=0,
            line_count=0,
            status="uploading",
            created_at=utcnow(),
        )

        def start(s):  # type: ignore[no-untyped-def]
            if s.get(Tenant, tenant_id) is None:
                raise NotFound(f"no tenant {tenant_id!r}")
            s.add(file)

        self._db.transact(start)
        size = newlines = 0
        last = b""
        try:
            for seq, piece in enumerate(_rechunk(content, chunk_bytes)):
                size += len(piece)
                if max_bytes is not None and size > max_bytes:
                    raise ValueError(f"file {filename!r} is larger than the {max_bytes}-byte limit")
                newlines += piece.count(b"\n")
                last = piece[-1:]
                row = {"file_id": file.id, "seq": seq, "data": piece}
                self._db.transact(lambda s, row=row: s.execute(insert(FileChunk), row))
            lines = newlines + (1 if size and last != b"\n" else 0)
            self._db.transact(
                lambda s: s.execute(
                    update(File).where(File.id == file.id).values(status="uploaded", bytes=size, line_count=lines)
                )
            )
        except BaseException:
            self._db.transact(lambda s: s.execute(delete(File).where(File.id == file.id)))
            raise
        file.status, file.bytes, file.line_count = "uploaded", size, lines
        return file

    def get(self, tenant_id: str, file_id: str) -> File | None:
        """The tenant's file (metadata only), or None."""
        with self._db.read() as s:
            return s.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id))

    def list_files(self, tenant_id: str, *, purpose: str | None = None, limit: int = 100) -> list[File]:
        """The tenant's uploaded files, newest first."""
        stmt = select(File).where(File.tenant_id == tenant_id, File.status == "uploaded")
        if purpose is not None:
            stmt = stmt.where(File.purpose == purpose)
        with self._db.read() as s:
            return list(s.scalars(stmt.order_by(File.created_at.desc(), File.id.desc()).limit(limit)))

    def count_files(self, tenant_id: str) -> int:
        """How many uploaded files the tenant has."""
        stmt = select(func.count()).select_from(File).where(File.tenant_id == tenant_id, File.status == "uploaded")
        with self._db.read() as s:
            return int(s.scalar(stmt) or 0)

    def open_content(self, tenant_id: str, file_id: str) -> Iterator[bytes]:
        """The file's content as an iterator of chunks (one chunk in memory at a time).

        Raises NotFound at once (not on first iteration) if the tenant has no such uploaded file.
        """
        file = self.get(tenant_id, file_id)
        if file is None or file.status != "uploaded":
            raise NotFound(f"no file {file_id!r} for this tenant")
        return self._chunks(file_id)

    def _chunks(self, file_id: str) -> Iterator[bytes]:
        seq = 0
        while True:
            with self._db.read() as s:
                data = s.scalar(select(FileChunk.data).where(FileChunk.file_id == file_id, FileChunk.seq == seq))
            if data is None:
                return
            yield bytes(data)
            seq += 1

    def open_lines(
        self, tenant_id: str, file_id: str, *, max_line_bytes: int = MAX_LINE_BYTES
    ) -> Iterator[tuple[int, bytes]]:
        """The file's lines as ``(line number from 1, bytes without the newline)``, streamed.

        Raises NotFound at once for a missing file; the iterator raises ValueError when a line is
        longer than ``max_line_bytes`` (memory stays bounded by it).
        """
        chunks = self.open_content(tenant_id, file_id)
        return _lines(chunks, max_line_bytes)

    def delete(self, tenant_id: str, file_id: str) -> bool:
        """Deletes the tenant's file and its content; False if the tenant has no such file.

        Batches that referenced it keep their other data (the reference becomes empty).
        """

        def work(s):  # type: ignore[no-untyped-def]
            return s.execute(delete(File).where(File.id == file_id, File.tenant_id == tenant_id)).rowcount == 1

        return self._db.transact(work)


def _lines(chunks: Iterator[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes]]:
    number = 0
    partial: list[bytes] = []
    held = 0
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                tail = chunk[start:]
                held += len(tail)
                if held > max_line_bytes:
                    raise ValueError(f"line {number + 1} is longer than {max_line_bytes} bytes")
                if tail:
                    partial.append(tail)
                break
            piece = chunk[start:end]
            if held + len(piece) > max_line_bytes:
                raise ValueError(f"line {number + 1} is longer than {max_line_bytes} bytes")
            number += 1
            yield number, (b"".join(partial) + piece if partial else piece)
            partial, held = [], 0
            start = end + 1
    if held:
        number += 1
        yield number, b"".join(partial)
