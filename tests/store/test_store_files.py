"""Files: streamed in and out in chunks, counted, deleted."""

from __future__ import annotations

import io

import pytest
from sqlalchemy import func, select

from store import NotFound, Store
from store.models import FileChunk


def test_content_round_trips_through_chunks(store: Store, tenant_id: str) -> None:
    data = b"".join(f'{{"n": {i}}}\n'.encode() for i in range(1000))
    file = store.files.create(tenant_id, io.BytesIO(data), purpose="batch", filename="in.jsonl", chunk_bytes=1000)
    assert (file.bytes, file.line_count, file.status) == (len(data), 1000, "uploaded")
    with store.db.read() as s:
        assert s.scalar(select(func.count()).select_from(FileChunk)) == -(-len(data) // 1000)
    assert b"".join(store.files.open_content(tenant_id, file.id)) == data
    lines = list(store.files.open_lines(tenant_id, file.id))
    assert lines[0] == (1, b'{"n": 0}') and lines[-1] == (1000, b'{"n": 999}') and len(lines) == 1000
    meta = store.files.get(tenant_id, file.id)
    assert meta is not None and meta.filename == "in.jsonl" and meta.purpose == "batch"


@pytest.mark.parametrize(
    ("parts", "lines"),
    [([b""], 0), ([b"a"], 1), ([b"a\n"], 1), ([b"a\nb"], 2), ([b"a", b"b\n", b"\nc"], 3)],
)
def test_line_count_with_and_without_final_newline(
    store: Store, tenant_id: str, parts: list[bytes], lines: int
) -> None:
    file = store.files.create(tenant_id, iter(parts), purpose="batch", filename="f", chunk_bytes=2)
    assert file.line_count == lines
    assert len(list(store.files.open_lines(tenant_id, file.id))) == lines
    assert b"".join(store.files.open_content(tenant_id, file.id)) == b"".join(parts)


def test_lines_spanning_many_chunks_come_back_whole(store: Store, tenant_id: str) -> None:
    long_line = b"x" * 5000
    file = store.files.create(
        tenant_id, [long_line, b"\nshort\n", long_line], purpose="batch", filename="f", chunk_bytes=64
    )
    assert [line for _, line in store.files.open_lines(tenant_id, file.id)] == [long_line, b"short", long_line]
    with pytest.raises(ValueError, match="line 1 is longer than 1000 bytes"):
        list(store.files.open_lines(tenant_id, file.id, max_line_bytes=1000))


def test_too_large_upload_leaves_nothing_behind(store: Store, tenant_id: str) -> None:
    with pytest.raises(ValueError, match="larger than the 100-byte limit"):
        store.files.create(
            tenant_id, io.BytesIO(b"y" * 500), purpose="batch", filename="big", max_bytes=100, chunk_bytes=64
        )
    assert store.files.count_files(tenant_id) == 0
    with store.db.read() as s:
        assert s.scalar(select(func.count()).select_from(FileChunk)) == 0


def test_delete_removes_the_file_and_its_content(store: Store, tenant_id: str) -> None:
    keep = store.files.create(tenant_id, io.BytesIO(b"k\n"), purpose="batch", filename="keep")
    gone = store.files.create(tenant_id, io.BytesIO(b"g\n" * 100), purpose="batch", filename="gone", chunk_bytes=16)
    assert store.files.delete(tenant_id, gone.id) is True
    assert store.files.delete(tenant_id, gone.id) is False
    assert store.files.get(tenant_id, gone.id) is None
    with pytest.raises(NotFound):
        store.files.open_content(tenant_id, gone.id)
    assert [f.id for f in store.files.list_files(tenant_id)] == [keep.id]
    with store.db.read() as s:
        assert s.scalar(select(func.count()).select_from(FileChunk).where(FileChunk.file_id == gone.id)) == 0


def test_list_filters_by_purpose_newest_first(store: Store, tenant_id: str) -> None:
    a = store.files.create(tenant_id, io.BytesIO(b"1"), purpose="batch", filename="a")
    b = store.files.create(tenant_id, io.BytesIO(b"2"), purpose="batch_output", filename="b")
    c = store.files.create(tenant_id, io.BytesIO(b"3"), purpose="batch", filename="c")
    assert [f.id for f in store.files.list_files(tenant_id, purpose="batch")] == [c.id, a.id]
    assert store.files.count_files(tenant_id) == 3 and b.purpose == "batch_output"
