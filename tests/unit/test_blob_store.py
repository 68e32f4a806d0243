"""Tests of the content-addressed blob store (`ravenp2p.data.store`)."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ravenp2p.data.store import BlobStore, StoreFullError, check_digest, chunk_digests

DATASETS = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"

StoreFactory = Callable[..., BlobStore]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["memory", "disk"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Builds stores of one kind: in memory, or in a folder under tmp_path."""

    def make(**kwargs: object) -> BlobStore:
        root = None if request.param == "memory" else tmp_path / "blobs"
        return BlobStore(root, **kwargs)  # type: ignore[arg-type]

    return make


# --- basic operations, both kinds ---------------------------------------------------------------


def test_put_get_has_size_read(make_store: StoreFactory) -> None:
    store = make_store()
    data = os.urandom(10_000)
    digest = store.put(data)
    assert digest == sha(data)
    assert store.has(digest)
    assert store.get(digest) == data
    assert store.size(digest) == len(data)
    assert store.read(digest, 0, 100) == data[:100]
    assert store.read(digest, 9_950, 100) == data[9_950:]  # short at the end
    assert store.read(digest, len(data), 10) == b""
    assert store.digests() == [digest]
    assert store.total_bytes == len(data)

    other = sha(b"not stored")
    assert not store.has(other)
    assert store.get(other) is None
    assert store.size(other) is None
    with pytest.raises(KeyError, match=other):
        store.read(other, 0, 1)
    with pytest.raises(ValueError, match="past the end"):
        store.read(digest, len(data) + 1, 1)
    with pytest.raises(ValueError, match="offset"):
        store.read(digest, -1, 1)
    with pytest.raises(ValueError, match="length"):
        store.read(digest, 0, -5)


def test_put_is_idempotent_and_delete(make_store: StoreFactory) -> None:
    store = make_store()
    first = store.put(b"same bytes")
    assert store.put(b"same bytes") == first
    store.put_verified(first, b"same bytes")
    assert store.digests() == [first]
    assert store.total_bytes == len(b"same bytes")
    empty = store.put(b"")
    assert store.get(empty) == b""
    assert sorted([first, empty]) == store.digests()
    store.delete(first)
    store.delete(first)  # deleting a missing blob is fine
    assert not store.has(first)
    assert store.digests() == [empty]
    assert store.total_bytes == 0


def test_put_verified_refuses_wrong_bytes(make_store: StoreFactory) -> None:
    store = make_store()
    claimed = sha(b"the real thing")
    with pytest.raises(ValueError, match=claimed):
        store.put_verified(claimed, b"an impostor")
    assert not store.has(claimed)
    assert store.total_bytes == 0
    store.put_verified(claimed, b"the real thing")
    assert store.get(claimed) == b"the real thing"


@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        "../" + "a" * 61,
        "/etc/passwd",
        "A" * 64,  # upper case
        "a" * 63,
        "a" * 65,
        "g" * 64,
        "",
        "aa/" + "a" * 61,
        None,
        b"a" * 64,
        12,
    ],
)
def test_bad_digests_refused_before_any_path(make_store: StoreFactory, bad: object) -> None:
    store = make_store()
    store.put(b"something")
    calls: list[Callable[[], object]] = [
        lambda: store.get(bad),  # type: ignore[arg-type]
        lambda: store.has(bad),  # type: ignore[arg-type]
        lambda: store.size(bad),  # type: ignore[arg-type]
        lambda: store.read(bad, 0, 1),  # type: ignore[arg-type]
        lambda: store.delete(bad),  # type: ignore[arg-type]
        lambda: store.pin(bad),  # type: ignore[arg-type]
        lambda: store.put_verified(bad, b"x"),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(ValueError, match="64 lowercase hex"):
            call()
    assert len(store.digests()) == 1


def test_check_digest() -> None:
    good = sha(b"x")
    assert check_digest(good) == good
    with pytest.raises(ValueError, match="manifest weights"):
        check_digest("nope", "manifest weights")


# --- on disk ----------------------------------------------------------------------------------


def test_disk_layout_permissions_and_reopen(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    store = BlobStore(root)
    data = os.urandom(4096)
    digest = store.put(data)
    path = root / digest[:2] / digest
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [digest]  # no temporary file left

    reopened = BlobStore(root)
    assert reopened.digests() == [digest]
    assert reopened.total_bytes == len(data)
    assert reopened.get(digest) == data


def test_disk_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "blobs"
    store = BlobStore(root)
    data = b"half-written blobs must never appear"
    digest = sha(data)

    def crash(src: object, dst: object) -> None:
        raise OSError("disk pulled out mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk pulled out"):
        store.put(data)
    monkeypatch.undo()
    assert not store.has(digest)
    assert store.total_bytes == 0
    folder = root / digest[:2]
    assert list(folder.iterdir()) == []  # neither the blob nor the temporary file

    # A temporary file left by a crashed process is cleaned up when the store opens.
    stale = folder / f".{digest}.123456.tmp"
    stale.write_bytes(data[:5])
    reopened = BlobStore(root)
    assert not stale.exists()
    assert reopened.digests() == []
    assert reopened.put(data) == digest
    assert reopened.get(digest) == data


def test_corrupt_file_is_dropped(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    store = BlobStore(root)
    good = os.urandom(2048)
    digest = store.put(good)
    path = root / digest[:2] / digest
    flipped = bytearray(good)
    flipped[1000] ^= 0x01
    path.write_bytes(bytes(flipped))
    assert store.get(digest) is None
    assert not path.exists()
    assert not store.has(digest)
    assert store.total_bytes == 0

    second = store.put(os.urandom(512))
    assert store.verify(second)
    second_path = root / second[:2] / second
    second_path.write_bytes(b"truncated")
    assert not store.verify(second)
    assert not second_path.exists()
    assert store.digests() == []


def test_files_under_wrong_names_are_ignored(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    digest = sha(b"x")
    (root / "zz").mkdir(parents=True)
    (root / "zz" / digest).write_bytes(b"x")  # not under its own prefix
    (root / digest[:2]).mkdir()
    (root / digest[:2] / "notes.txt").write_bytes(b"hello")
    assert BlobStore(root).digests() == []


def test_real_dataset_file_as_blob(tmp_path: Path) -> None:
    source = DATASETS / "mnist" / "t10k-labels.idx1-ubyte.gz"
    if not source.is_file():
        pytest.skip(f"MNIST test labels not available at {source}")
    raw = source.read_bytes()
    labels = gzip.decompress(raw)
    store = BlobStore(tmp_path / "blobs")
    digest = store.put(labels)
    assert digest == sha(labels)
    assert int.from_bytes(store.read(digest, 0, 4), "big") == 2049  # IDX label-file magic
    assert int.from_bytes(store.read(digest, 4, 4), "big") == 10_000
    assert store.get(digest) == labels


# --- eviction and pins ------------------------------------------------------------------------


def test_lru_eviction_respects_pins(make_store: StoreFactory) -> None:
    store = make_store(max_bytes=300)
    a, b, c = (store.put(bytes([i]) * 100) for i in range(3))
    assert store.total_bytes == 300
    store.pin(a)  # oldest, but needed
    store.get(b)  # b is now more recent than c
    d = store.put(b"d" * 100)
    assert store.has(a) and store.has(b) and store.has(d)
    assert not store.has(c)  # least recently used and unpinned
    assert store.total_bytes == 300

    e = store.put(b"e" * 150)  # needs room for 150: b then d go (a is pinned)
    assert store.has(a) and store.has(e)
    assert not store.has(b) and not store.has(d)
    assert store.total_bytes == 250

    store.pin(e)
    with pytest.raises(StoreFullError, match="pinned"):
        store.put(b"f" * 100)
    with pytest.raises(StoreFullError, match="max_bytes=300"):
        store.put(b"g" * 301)
    assert sorted([a, e]) == store.digests()

    store.unpin(a)
    f = store.put(b"f" * 100)
    assert not store.has(a) and store.has(f)


def test_pins_are_counted(make_store: StoreFactory) -> None:
    store = make_store(max_bytes=100)
    digest = sha(b"k" * 100)
    store.pin(digest)  # before the blob arrives
    store.pin(digest)
    store.put(b"k" * 100)
    store.unpin(digest)
    assert store.is_pinned(digest)
    with pytest.raises(StoreFullError):
        store.put(b"z" * 10)
    store.unpin(digest)
    assert not store.is_pinned(digest)
    with pytest.raises(ValueError, match="not pinned"):
        store.unpin(digest)
    store.put(b"z" * 10)
    assert not store.has(digest)


def test_reopen_over_budget_evicts_oldest(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    unlimited = BlobStore(root)
    old = unlimited.put(b"o" * 100)
    path = root / old[:2] / old
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # clearly the oldest
    new = unlimited.put(b"n" * 100)
    limited = BlobStore(root, max_bytes=150)
    assert limited.digests() == [new]
    assert not path.exists()


def test_bad_max_bytes() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        BlobStore(None, max_bytes=-1)


# --- chunk digests ----------------------------------------------------------------------------


def test_chunk_digests() -> None:
    data = os.urandom(2500)
    assert chunk_digests(data, 1000) == [sha(data[:1000]), sha(data[1000:2000]), sha(data[2000:])]
    assert chunk_digests(data, 2500) == [sha(data)]
    assert chunk_digests(b"", 10) == []
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="chunk_size"):
            chunk_digests(data, bad)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=3000), piece=st.integers(min_value=1, max_value=700))
def test_pieces_reassemble(data: bytes, piece: int) -> None:
    store = BlobStore(None)
    digest = store.put(data)
    parts = [store.read(digest, off, piece) for off in range(0, len(data), piece)]
    assert b"".join(parts) == data
    assert chunk_digests(data, piece) == [sha(p) for p in parts]
