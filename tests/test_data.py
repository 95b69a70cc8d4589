"""The byte corpus: deterministic files and split, honest batches, a sane unigram baseline."""

from __future__ import annotations

import collections
import math
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fsharding import data

SMALL = 300_000


@pytest.fixture(scope="module")
def corpus() -> data.Corpus:
    return data.load(SMALL)


def _write_tree(root: Path) -> dict[str, bytes]:
    files = {
        "b.py": b"print('b')\n",
        "a.py": b"import os\n" * 5,
        "pkg/z.py": bytes(range(256)),  # every byte value, incl. invalid UTF-8
        "pkg/m.py": b"x = 1\n",
        "pkg/notes.txt": b"not python\n",
        "test/t.py": b"skipped\n",
        "site-packages/s.py": b"skipped\n",
        "pkg/__pycache__/c.py": b"skipped\n",
    }
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return files


def test_reads_py_files_in_sorted_order_and_splits_by_file(tmp_path):
    files = _write_tree(tmp_path)
    c = data.load.__wrapped__(10**6, root=str(tmp_path), val_fraction=0.5)
    assert c.files == ("a.py", "b.py", "pkg/m.py", "pkg/z.py")
    assert c.val_files and set(c.val_files) < set(c.files)
    train = b"".join(files[f] for f in c.files if f not in c.val_files)
    val = b"".join(files[f] for f in c.val_files)
    assert bytes(c.train.tolist()) == train and bytes(c.val.tolist()) == val


def test_cap_stops_after_the_file_that_reaches_it(tmp_path):
    for i in range(40):
        (tmp_path / f"f{i:02d}.py").write_bytes(b"%09d\n" % i)  # 10 bytes each
    c = data.load.__wrapped__(95, root=str(tmp_path), val_fraction=0.5)
    assert c.files == tuple(f"f{i:02d}.py" for i in range(10))
    assert c.train.numel() + c.val.numel() == 100
    with pytest.raises(ValueError, match="split is empty.*raise max_bytes"):
        data.load.__wrapped__(5, root=str(tmp_path), val_fraction=0.5)


def test_stdlib_corpus_is_deterministic_capped_and_fast():
    t0 = time.perf_counter()
    a = data.load.__wrapped__(data.DEFAULT_MAX_BYTES)
    assert time.perf_counter() - t0 < 3.0
    b = data.load.__wrapped__(data.DEFAULT_MAX_BYTES)
    assert a.files == b.files and a.val_files == b.val_files
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    total = a.train.numel() + a.val.numel()
    assert data.DEFAULT_MAX_BYTES <= total < data.DEFAULT_MAX_BYTES + 2_000_000
    assert list(a.files) == sorted(a.files)
    assert not any(part in ("test", "site-packages") for f in a.files for part in f.split("/"))
    # roughly 10% of bytes in val, and val is not a prefix/suffix of train
    assert 0.03 < a.val.numel() / total < 0.2
    assert data.load(SMALL) is data.load(SMALL)  # cached


@given(batch=st.integers(1, 5), seq=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_batches_are_shifted_windows_of_the_split(corpus, batch, seq, seed):
    for split in ("train", "val"):
        stream = corpus.batches(split, batch, seq, torch.Generator().manual_seed(seed))
        b = next(stream)
        x, y = b["x"], b["y"]
        assert x.shape == y.shape == (batch, seq) and x.dtype == y.dtype == torch.int64
        assert int(x.min()) >= 0 and int(x.max()) <= 255
        assert torch.equal(x[:, 1:], y[:, :-1])
        text = bytes(corpus.split(split).tolist())
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            assert bytes(row_x + row_y[-1:]) in text  # a real window of this split


def test_batches_are_deterministic_given_the_generator(corpus):
    def take(seed, n=3):
        stream = corpus.batches("train", 4, 16, torch.Generator().manual_seed(seed))
        return [next(stream)["x"] for _ in range(n)]

    first, again, other = take(7), take(7), take(8)
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])  # the stream moves on


def test_unigram_baseline_is_the_cross_entropy_of_val_under_train(corpus):
    train = collections.Counter(corpus.train.tolist())
    val = collections.Counter(corpus.val.tolist())
    n_train = sum(train.values()) + 256
    expected = -sum(
        cnt * math.log((train.get(byte, 0) + 1) / n_train) for byte, cnt in val.items()
    ) / sum(val.values())
    baseline = corpus.unigram_baseline()
    assert baseline == pytest.approx(expected, rel=1e-12)
    val_entropy = -sum(
        c / corpus.val.numel() * math.log(c / corpus.val.numel()) for c in val.values()
    )
    assert val_entropy <= baseline  # Gibbs: cross-entropy >= entropy
    assert 2.0 < baseline < 5.0  # nats; Python source: ~3.4, uniform bytes would be 5.55


def test_encode_decode_round_trip():
    assert data.decode(data.encode("déf ∑\n")) == "déf ∑\n"
    assert data.decode(torch.tensor([0xFF, 104])) == "\ufffdh"  # invalid UTF-8 replaced


def test_errors_say_what_to_do(corpus):
    with pytest.raises(ValueError, match="split must be 'train' or 'val', got 'test'"):
        corpus.split("test")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        next(corpus.batches("val", 1, corpus.val.numel()))
    with pytest.raises(ValueError, match="max_bytes must be >= 1"):
        data.load(0)
