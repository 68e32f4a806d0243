"""Datasets load deterministically, shards are canonical, and bad data is refused by name."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest

from ravenp2p.training.datasets import (
    DataInfo,
    DatasetError,
    Split,
    cut_shards,
    load_dataset,
    read_shard,
)
from ravenp2p.training.spec import DatasetSpec
from ravenp2p.training.tensors import TensorFormatError, digest_of, encode_tensors

DATASETS = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"
MNIST = DATASETS / "mnist"
SHAKESPEARE = DATASETS / "shakespeare" / "plays.txt.gz"
MNIST_FILES = ("train-images", "train-labels", "t10k-images", "t10k-labels")


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared dataset {path.name} is not available")
    return path


def combined(train: Split, holdout: Split) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.concatenate([train.inputs, holdout.inputs]),
        np.concatenate([train.targets, holdout.targets]),
    )


# digits ---------------------------------------------------------------------


def test_digits_shapes_classes_and_holdout() -> None:
    from sklearn.datasets import load_digits

    info, train, holdout = load_dataset(DatasetSpec("digits", holdout=0.1))
    assert info == DataInfo("image", "classification", (1, 8, 8), 10, scale=1 / 16)
    assert info.input_dtype == np.uint8
    assert len(holdout) == int(1797 * 0.1)
    assert len(train) + len(holdout) == 1797
    assert train.inputs.shape == (len(train), 1, 8, 8)
    assert train.inputs.dtype == np.uint8 and train.targets.dtype == np.int64
    assert int(train.inputs.max()) == 16
    assert set(np.unique(train.targets)) == set(range(10))
    # Every (image, label) pair is one of the originals, none lost or duplicated.
    bunch = load_digits()
    original = sorted(
        (bytes(img.astype(np.uint8)), int(y))
        for img, y in zip(bunch.images, bunch.target, strict=True)
    )
    inputs, targets = combined(train, holdout)
    loaded = sorted((bytes(x[0]), int(y)) for x, y in zip(inputs, targets, strict=True))
    assert loaded == original


def test_digits_is_deterministic_and_max_samples_caps_train() -> None:
    _, train_a, hold_a = load_dataset(DatasetSpec("digits", holdout=0.2))
    _, train_b, hold_b = load_dataset(DatasetSpec("digits", holdout=0.2))
    assert np.array_equal(train_a.inputs, train_b.inputs)
    assert np.array_equal(hold_a.targets, hold_b.targets)
    _, capped, hold_c = load_dataset(DatasetSpec("digits", holdout=0.2, max_samples=100))
    assert len(capped) == 100
    assert np.array_equal(capped.inputs, train_a.inputs[:100])
    assert np.array_equal(hold_c.inputs, hold_a.inputs)


def test_format_errors_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"data\.bin: cannot tell the format"):
        load_dataset(DatasetSpec(str(tmp_path / "data.bin")))
    with pytest.raises(DatasetError, match="format 'digits' takes source 'digits'"):
        load_dataset(DatasetSpec("other", format="digits"))
    with pytest.raises(DatasetError, match=r"missing\.csv: no such file"):
        load_dataset(DatasetSpec(str(tmp_path / "missing.csv")))


# MNIST ----------------------------------------------------------------------


def test_mnist_gzipped_from_shared_folder() -> None:
    folder = require(MNIST)
    info, train, holdout = load_dataset(DatasetSpec(str(folder), holdout=0.5))
    assert info.kind == "image" and info.input_shape == (1, 28, 28)
    assert info.num_classes == 10
    assert (info.scale, info.mean, info.std) == (1 / 255, 0.1307, 0.3081)
    # The t10k files are the holdout; the spec's fraction does not apply.
    assert len(train) == 60000 and len(holdout) == 10000
    assert train.inputs.dtype == np.uint8
    # The published normalisation constants fit the pixels actually read.
    pixels = train.inputs[:5000].astype(np.float64) * info.scale
    assert abs(pixels.mean() - info.mean) < 0.01
    assert abs(pixels.std() - info.std) < 0.01
    assert np.bincount(holdout.targets, minlength=10).min() > 800


def test_mnist_ungzipped_with_both_namings(tmp_path: Path) -> None:
    folder = require(MNIST)
    _, reference_train, reference_hold = load_dataset(DatasetSpec(str(folder)))
    for separator in ("-", "."):
        target = tmp_path / f"plain{separator}"
        target.mkdir()
        for stem in MNIST_FILES:
            rank = 3 if stem.endswith("images") else 1
            (source,) = folder.glob(f"{stem}*idx{rank}-ubyte.gz")
            with (
                gzip.open(source, "rb") as src,
                open(target / f"{stem}{separator}idx{rank}-ubyte", "wb") as dst,
            ):
                shutil.copyfileobj(src, dst)
        _, train, holdout = load_dataset(DatasetSpec(str(target), format="mnist"))
        assert np.array_equal(train.inputs, reference_train.inputs)
        assert np.array_equal(train.targets, reference_train.targets)
        assert np.array_equal(holdout.inputs, reference_hold.inputs)


def idx_bytes(array: np.ndarray, *, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, images: np.ndarray, labels: np.ndarray, *, test: bool) -> None:
    folder.mkdir(exist_ok=True)
    parts = [("train", images, labels)]
    if test:
        parts.append(("t10k", images[:5], labels[:5]))
    for prefix, x, y in parts:
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y)))


def small_mnist() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, (40, 6, 5)), np.arange(40) % 10


def test_mnist_without_t10k_splits_by_fraction(tmp_path: Path) -> None:
    images, labels = small_mnist()
    write_mnist(tmp_path / "m", images, labels, test=False)
    info, train, holdout = load_dataset(DatasetSpec(str(tmp_path / "m"), holdout=0.25))
    assert info.input_shape == (1, 6, 5)
    assert (len(train), len(holdout)) == (30, 10)
    inputs, targets = combined(train, holdout)
    # Labels still belong to their images after the shuffle.
    for x, y in zip(inputs, targets, strict=True):
        (index,) = np.flatnonzero((images == x[0]).all(axis=(1, 2)))
        assert labels[index] == y


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("train-images-idx3-ubyte.gz", b"\x01\x00\x08\x03" + bytes(12), "bad IDX magic"),
        ("train-images-idx3-ubyte.gz", b"\x00\x00\x0d\x03" + bytes(12), "element type 0x0d"),
        ("train-labels-idx1-ubyte.gz", b"\x00\x00\x08\x02" + bytes(8), "IDX rank 2"),
        ("train-labels-idx1-ubyte.gz", b"\x00\x00\x08", "too short"),
        ("train-images-idx3-ubyte.gz", "truncate", "truncated"),
        ("train-labels-idx1-ubyte.gz", "short-labels", "39 labels for 40 images"),
        ("train-labels-idx1-ubyte.gz", "label-11", "label 11 is out of range"),
        ("train-images-idx3-ubyte.gz", "bad-gzip", "broken or truncated gzip"),
    ],
)
def test_corrupt_idx_is_refused_naming_the_file(
    tmp_path: Path, file: str, content: bytes | str, message: str
) -> None:
    images, labels = small_mnist()
    folder = tmp_path / "m"
    write_mnist(folder, images, labels, test=True)
    if content == "truncate":
        data = idx_bytes(images)[:-7]
    elif content == "short-labels":
        data = idx_bytes(labels[:-1])
    elif content == "label-11":
        data = idx_bytes(np.where(labels == 3, 11, labels))
    elif content == "bad-gzip":
        (folder / file).write_bytes(gzip.compress(idx_bytes(images))[:-20])
        data = None
    else:
        assert isinstance(content, bytes)
        data = content
    if data is not None:
        (folder / file).write_bytes(gzip.compress(data))
    with pytest.raises(DatasetError, match=message) as caught:
        load_dataset(DatasetSpec(str(folder)))
    assert file in str(caught.value)


def test_mnist_folder_without_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no train-images/train-labels"):
        load_dataset(DatasetSpec(str(tmp_path)))


# npz, csv, text ----------------------------------------------------------------


def test_npz_tabular_standardised_with_string_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    count = 200
    ids = rng.permutation(count).astype(np.float64)
    features = np.column_stack([ids, rng.normal(5.0, 3.0, count), np.full(count, 2.0)])
    names = np.array(["zebra", "ant", "moth"])[ids.astype(int) % 3]
    np.savez(tmp_path / "t.npz", X=features, y=names)
    info, train, holdout = load_dataset(DatasetSpec(str(tmp_path / "t.npz"), holdout=0.25))
    assert info.to_dict()["kind"] == "tabular"
    assert (info.input_shape, info.num_classes) == ((3,), 3)
    assert train.inputs.dtype == np.float32 and (len(train), len(holdout)) == (150, 50)
    assert np.allclose(train.inputs.mean(axis=0), 0, atol=1e-5)
    assert np.allclose(train.inputs[:, :2].std(axis=0), 1, atol=1e-4)
    assert np.all(train.inputs[:, 2] == 0)  # a constant feature is centred, not divided by 0
    # Standardising is monotonic per feature, so the id column still orders the rows.
    inputs, targets = combined(train, holdout)
    order = np.argsort(inputs[:, 0])
    expected = np.array([2, 0, 1])[np.arange(count) % 3]  # sorted names: ant, moth, zebra
    assert np.array_equal(targets[order], expected)


def test_npz_images_uint8_and_channels_last(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (30, 7, 7), dtype=np.uint8)
    labels = images[:, 0, 0] % 4
    np.savez(tmp_path / "gray.npz", x=images, y=labels)
    info, train, _ = load_dataset(DatasetSpec(str(tmp_path / "gray.npz")))
    assert info.input_shape == (1, 7, 7) and info.input_dtype == np.uint8
    assert info.scale == 1 / 255 and info.std > 0
    assert np.array_equal(train.inputs[:, 0, 0, 0] % 4, train.targets)
    colour = rng.normal(size=(30, 9, 9, 3)).astype(np.float32)
    np.savez(tmp_path / "rgb.npz", inputs=colour, targets=np.arange(30) % 2)
    info, train, holdout = load_dataset(DatasetSpec(str(tmp_path / "rgb.npz")))
    assert info.input_shape == (3, 9, 9) and info.identity_transform
    assert train.inputs.dtype == np.float32 and holdout.inputs.shape[1:] == (3, 9, 9)


def test_npz_refusals(tmp_path: Path) -> None:
    np.savez(tmp_path / "names.npz", a=np.zeros((4, 2)), b=np.zeros(4))
    with pytest.raises(
        DatasetError, match="expected arrays x/y, inputs/targets or X/y; found a, b"
    ):
        load_dataset(DatasetSpec(str(tmp_path / "names.npz")))
    np.savez(tmp_path / "neg.npz", x=np.zeros((4, 2)), y=np.array([0, 1, -1, 1]))
    with pytest.raises(DatasetError, match="label -1 is negative"):
        load_dataset(DatasetSpec(str(tmp_path / "neg.npz")))
    np.savez(tmp_path / "obj.npz", x=np.array([{}, {}], dtype=object), y=np.zeros(2))
    with pytest.raises(DatasetError, match=r"obj\.npz: cannot read arrays \(Object arrays"):
        load_dataset(DatasetSpec(str(tmp_path / "obj.npz")))


def test_csv_round_trip_with_class_names(tmp_path: Path) -> None:
    rows = ["a,label,b"] + [f"{i},{'dog' if i % 3 else 'cat'},{i * i}" for i in range(60)]
    (tmp_path / "pets.csv").write_text("\n".join(rows) + "\n\n")
    info, train, holdout = load_dataset(DatasetSpec(str(tmp_path / "pets.csv"), holdout=0.1))
    assert (info.kind, info.input_shape, info.num_classes) == ("tabular", (2,), 2)
    assert (len(train), len(holdout)) == (54, 6)
    inputs, targets = combined(train, holdout)
    order = np.argsort(inputs[:, 0])
    assert np.array_equal(targets[order], (np.arange(60) % 3 != 0).astype(np.int64))
    assert np.array_equal(np.argsort(inputs[:, 1]), order)


def test_csv_integer_labels_and_custom_column(tmp_path: Path) -> None:
    rows = ["x,cls"] + [f"{i / 10},{i % 4}" for i in range(20)]
    (tmp_path / "n.csv").write_text("\n".join(rows))
    info, train, _ = load_dataset(DatasetSpec(str(tmp_path / "n.csv"), label_column="cls"))
    assert info.num_classes == 4
    assert set(np.unique(train.targets)) <= {0, 1, 2, 3}


def test_csv_errors_name_row_and_column(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(
        DatasetError, match=r"data\.csv: label column 'label' not found \(columns: a, b, c\)"
    ):
        load_dataset(DatasetSpec(str(path)))
    path.write_text("a,b,label\n1,2,x\n3,oops,y\n")
    with pytest.raises(DatasetError, match=r"data\.csv: row 3, column 'b': 'oops' is not"):
        load_dataset(DatasetSpec(str(path)))
    path.write_text("a,b,label\n1,2,x\n3,nan,y\n")
    with pytest.raises(DatasetError, match=r"row 3, column 'b': 'nan' is not a finite number"):
        load_dataset(DatasetSpec(str(path)))
    path.write_text("a,b,label\n1,2,x\n3,4\n")
    with pytest.raises(DatasetError, match="row 3 has 2 cells, the header has 3"):
        load_dataset(DatasetSpec(str(path)))
    path.write_text("a,b,label\n1,2,x\n3,4,x\n")
    with pytest.raises(DatasetError, match="at least 2 are needed"):
        load_dataset(DatasetSpec(str(path)))


@pytest.mark.parametrize("name", ["story.txt", "story.txt.gz"])
def test_text_windows_vocab_and_holdout(tmp_path: Path, name: str) -> None:
    text = "".join(f"line {i}: the quick brown fox {i * 7}.\n" for i in range(120))
    data = text.encode()
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    seq_len = 16
    info, train, holdout = load_dataset(
        DatasetSpec(str(tmp_path / name), seq_len=seq_len, holdout=0.2)
    )
    assert (info.kind, info.task, info.input_shape) == ("text", "language", (seq_len,))
    assert info.vocab == "".join(sorted(set(text)))
    windows = len(text) // (seq_len + 1)
    assert len(train) + len(holdout) == windows
    assert len(holdout) == int(windows * 0.2)
    assert train.inputs.dtype == np.int64 and train.targets.shape == (len(train), seq_len)
    assert np.array_equal(train.inputs[:, 1:], train.targets[:, :-1])
    # The holdout is the tail of the text, in order.
    vocab = np.array(list(info.vocab))
    first = windows - len(holdout)
    tail = "".join(
        "".join(vocab[x]) + vocab[y[-1]]
        for x, y in zip(holdout.inputs, holdout.targets, strict=True)
    )
    width = seq_len + 1
    assert tail == text[first * width : windows * width]


def test_text_refusals(tmp_path: Path) -> None:
    wide = tmp_path / "wide.txt"
    wide.write_text("".join(chr(0x400 + i) for i in range(300)) * 3)
    with pytest.raises(DatasetError, match=r"wide\.txt: 300 distinct characters, at most 256"):
        load_dataset(DatasetSpec(str(wide)))
    short = tmp_path / "short.txt"
    short.write_text("abcabc")
    with pytest.raises(DatasetError, match="make 0 windows"):
        load_dataset(DatasetSpec(str(short), seq_len=8))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ab\xff\xfe")
    with pytest.raises(DatasetError, match=r"bin\.txt: not UTF-8 text \(byte 2\)"):
        load_dataset(DatasetSpec(str(binary)))


def test_shakespeare_loads() -> None:
    path = require(SHAKESPEARE)
    info, train, holdout = load_dataset(DatasetSpec(str(path), seq_len=64, max_samples=500))
    assert info.vocab_size is not None and 40 < info.vocab_size <= 256
    assert "e" in (info.vocab or "") and len(train) == 500
    assert int(holdout.targets.max()) < info.vocab_size


# shards ---------------------------------------------------------------------


def test_shards_are_equal_sized_deterministic_and_ordered() -> None:
    info, train, _ = load_dataset(DatasetSpec("digits"))
    shards = cut_shards(train, 100)
    assert len(shards) == len(train) // 100
    again = cut_shards(load_dataset(DatasetSpec("digits"))[1], 100)
    assert [digest_of(s) for s in shards] == [digest_of(s) for s in again]
    assert len({digest_of(s) for s in shards}) == len(shards)
    for index, data in enumerate(shards):
        shard = read_shard(data, info)
        assert len(shard) == 100
        assert np.array_equal(shard.inputs, train.inputs[index * 100 : (index + 1) * 100])
        assert np.array_equal(shard.targets, train.targets[index * 100 : (index + 1) * 100])
    (whole,) = cut_shards(Split(train.inputs[:30], train.targets[:30]), 64)
    assert len(read_shard(whole, info)) == 30
    with pytest.raises(DatasetError, match="samples_per_shard"):
        cut_shards(train, 0)


def digits_info() -> DataInfo:
    return DataInfo("image", "classification", (1, 8, 8), 10, scale=1 / 16)


def good_tensors(count: int = 4) -> dict[str, np.ndarray]:
    return {
        "inputs": np.zeros((count, 1, 8, 8), dtype=np.uint8),
        "targets": np.arange(count, dtype=np.int64),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"targets": np.array([0, 1, 10, 2], dtype=np.int64)}, "class ids 10, allowed 0..9"),
        ({"targets": np.array([0, -1, 1, 2], dtype=np.int64)}, "class ids -1"),
        ({"inputs": np.zeros((4, 1, 8, 7), dtype=np.uint8)}, "'inputs' has shape"),
        ({"inputs": np.zeros((4, 1, 8, 8), dtype=np.float32)}, "dtype float32, expected uint8"),
        ({"targets": np.arange(4, dtype=np.int32)}, "dtype int32, expected int64"),
        ({"targets": np.arange(3, dtype=np.int64)}, "'targets' has shape"),
        ({"extra": np.zeros(1, dtype=np.uint8)}, "expected exactly"),
    ],
)
def test_read_shard_refuses_misfits(change: dict[str, np.ndarray], message: str) -> None:
    tensors = good_tensors()
    assert len(read_shard(encode_tensors(tensors), digits_info())) == 4
    tensors.update(change)
    with pytest.raises(DatasetError, match=message):
        read_shard(encode_tensors(tensors), digits_info())


def test_read_shard_refuses_bad_bytes_and_text_misfits() -> None:
    data = encode_tensors(good_tensors())
    with pytest.raises(TensorFormatError):
        read_shard(data[:-3], digits_info())
    with pytest.raises(TensorFormatError, match="more than the limit"):
        read_shard(data, digits_info(), max_bytes=100)
    with pytest.raises(DatasetError, match="expected exactly"):
        read_shard(encode_tensors({"inputs": good_tensors()["inputs"]}), digits_info())
    text = DataInfo("text", "language", (5,), vocab="abc")
    tokens = np.array([[0, 1, 2, 0, 1]], dtype=np.int64)
    assert len(read_shard(encode_tensors({"inputs": tokens, "targets": tokens}), text)) == 1
    bad = tokens.copy()
    bad[0, 3] = 3
    with pytest.raises(DatasetError, match=r"'inputs' holds token ids 3, allowed 0\.\.2"):
        read_shard(encode_tensors({"inputs": bad, "targets": tokens}), text)
    table = DataInfo("tabular", "classification", (2,), 2)
    features = np.array([[0.0, np.nan]], dtype=np.float32)
    targets = np.zeros(1, dtype=np.int64)
    with pytest.raises(DatasetError, match="NaN"):
        read_shard(encode_tensors({"inputs": features, "targets": targets}), table)


# DataInfo -------------------------------------------------------------------


def test_data_info_round_trips_through_msgpack() -> None:
    infos = [
        digits_info(),
        DataInfo("image", "classification", (1, 28, 28), 10, scale=1 / 255, mean=0.13, std=0.31),
        DataInfo("tabular", "classification", (13,), 3),
        DataInfo("text", "language", (64,), vocab="\n !abcé"),
    ]
    for info in infos:
        data = msgpack.unpackb(msgpack.packb(info.to_dict()))
        assert DataInfo.from_dict(data) == info
    assert infos[3].vocab_size == 7 and infos[0].vocab_size is None


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"kind": "audio"}, "'kind'"),
        ({"task": "language"}, "'task'"),
        ({"input_shape": [8, 8]}, "'input_shape'"),
        ({"input_shape": [1, 0, 8]}, "'input_shape'"),
        ({"input_shape": "1,8,8"}, "'input_shape'"),
        ({"input_shape": [1, 8.0, 8]}, "'input_shape'"),
        ({"num_classes": 1}, "'num_classes'"),
        ({"num_classes": True}, "'num_classes'"),
        ({"vocab": "ab"}, "'vocab'"),
        ({"scale": float("nan")}, "'scale'"),
        ({"std": 0.0}, "'std'"),
        ({"mean": "0"}, "'mean'"),
        ({"colour": 1}, "unknown keys colour"),
    ],
)
def test_data_info_from_dict_refuses(change: dict[str, object], key: str) -> None:
    data = digits_info().to_dict()
    data.update(change)
    with pytest.raises(DatasetError, match=key):
        DataInfo.from_dict(data)


def test_data_info_from_dict_refuses_shapes_of_input() -> None:
    with pytest.raises(DatasetError, match="must be a mapping"):
        DataInfo.from_dict([1, 2])
    data = digits_info().to_dict()
    del data["task"]
    with pytest.raises(DatasetError, match="missing keys task"):
        DataInfo.from_dict(data)
    text = DataInfo("text", "language", (4,), vocab="ab").to_dict()
    for change, key in (({"vocab": "aab"}, "repeated"), ({"num_classes": 2}, "'num_classes'")):
        with pytest.raises(DatasetError, match=key):
            DataInfo.from_dict({**text, **change})
    with pytest.raises(DatasetError, match="identity transform"):
        DataInfo.from_dict({**text, "scale": 0.5})
