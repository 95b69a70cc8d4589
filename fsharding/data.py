"""A character-level (byte) corpus from the Python standard library's own sources.

No downloads: the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (tests, site- and
dist-packages excluded) are read in sorted path order up to ``max_bytes`` and kept as bytes,
so token ids are 0..255. Each file goes wholly to train or to val, decided by a hash of its
relative path (about ``val_fraction`` of the files), so the split is deterministic and never
cuts a file in two.

>>> corpus = load(max_bytes=200_000)
>>> batch = next(corpus.batches("train", 2, 16, generator=torch.Generator().manual_seed(0)))
>>> batch["x"].shape, bool((batch["x"][:, 1:] == batch["y"][:, :-1]).all())
(torch.Size([2, 16]), True)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["Corpus", "load", "batches", "encode", "decode", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_BYTES = 4_000_000
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Byte ids of the train and val splits (uint8 tensors) and the files they came from.

    Attributes:
        train: 1-D uint8 tensor, the concatenated train files.
        val: 1-D uint8 tensor, the concatenated val files.
        files: relative paths of all files read, in order.
        val_files: the subset of ``files`` that went to val.
    """

    train: torch.Tensor
    val: torch.Tensor
    files: tuple[str, ...]
    val_files: tuple[str, ...]

    def split(self, name: str) -> torch.Tensor:
        """The ids of split ``name`` (``"train"`` or ``"val"``)."""
        if name not in _SPLITS:
            raise ValueError(f"Corpus: split must be 'train' or 'val', got {name!r}.")
        return self.train if name == "train" else self.val

    def batches(
        self,
        split: str,
        batch_size: int,
        seq_len: int,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """An endless stream of random windows: ``{"x": [B, T], "y": [B, T]}`` int64.

        ``y`` is ``x`` shifted left by one (the next byte). Window starts are drawn
        uniformly with ``generator``, so a seeded generator gives the same stream.

        Example:
            >>> c = load(max_bytes=100_000)
            >>> next(c.batches("val", 3, 8))["y"].shape
            torch.Size([3, 8])
        """
        data = self.split(split)
        if batch_size < 1 or seq_len < 1:
            raise ValueError(
                f"Corpus.batches: batch_size and seq_len must be >= 1, got {batch_size} and "
                f"{seq_len}."
            )
        if data.numel() < seq_len + 1:
            raise ValueError(
                f"Corpus.batches: split {split!r} has {data.numel()} bytes, fewer than "
                f"seq_len + 1 = {seq_len + 1}; load more data (a larger max_bytes)."
            )
        window = torch.arange(seq_len + 1)
        while True:
            starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
            chunk = data[starts[:, None] + window].long()
            yield {"x": chunk[:, :-1].contiguous(), "y": chunk[:, 1:].contiguous()}

    def unigram_baseline(self) -> float:
        """Cross-entropy (nats per byte) of the val split under the train byte frequencies.

        The loss of a model that ignores context: what a trained model must beat. Train
        counts get add-one smoothing so a byte unseen in train has finite cost.

        Example:
            >>> 2.0 < load(max_bytes=100_000).unigram_baseline() < 5.5
            True
        """
        counts = torch.bincount(self.train.long(), minlength=256).double() + 1.0
        log_p = (counts / counts.sum()).log()
        val_freq = torch.bincount(self.val.long(), minlength=256).double()
        return float(-(val_freq * log_p).sum() / val_freq.sum())


def _stdlib_files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _is_val(relpath: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


@functools.lru_cache(maxsize=4)
def load(
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    root: str | None = None,
    val_fraction: float = 0.1,
) -> Corpus:
    """Reads the standard library's ``.py`` files into a :class:`Corpus` (cached).

    Args:
        max_bytes: stop after the file that reaches this many bytes in total (sorted path
            order), so loading stays fast; the default reads about 4 MB.
        root: directory to read instead of ``sysconfig.get_paths()["stdlib"]``.
        val_fraction: approximate fraction of files assigned to val (by path hash).

    Returns:
        The corpus; the same arguments return the same (cached) object.

    Raises:
        ValueError: bad ``max_bytes`` / ``val_fraction``, or a split came out empty.

    Example:
        >>> c = load(max_bytes=100_000)
        >>> c.train.dtype, c.val.numel() > 0
        (torch.uint8, True)
    """
    if max_bytes < 1:
        raise ValueError(f"data.load: max_bytes must be >= 1, got {max_bytes!r}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.load: val_fraction must be in (0, 1), got {val_fraction!r}.")
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    files, val_files, total = [], [], 0
    for path in _stdlib_files(base):
        rel = path.relative_to(base).as_posix()
        data = path.read_bytes()
        split = "val" if _is_val(rel, val_fraction) else "train"
        parts[split].append(data)
        files.append(rel)
        if split == "val":
            val_files.append(rel)
        total += len(data)
        if total >= max_bytes:
            break
    tensors = {}
    for split, chunks in parts.items():
        buf = bytearray(b"".join(chunks))
        if not buf:
            raise ValueError(
                f"data.load: the {split} split is empty ({len(files)} files, {total} bytes "
                f"read from {str(base)!r}); raise max_bytes or change val_fraction."
            )
        tensors[split] = torch.frombuffer(buf, dtype=torch.uint8)
    return Corpus(tensors["train"], tensors["val"], tuple(files), tuple(val_files))


def batches(
    split: str,
    batch_size: int,
    seq_len: int,
    generator: torch.Generator | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[dict[str, torch.Tensor]]:
    """``load(max_bytes).batches(split, batch_size, seq_len, generator)``.

    Example:
        >>> b = next(batches("train", 2, 4, max_bytes=100_000))
        >>> sorted(b), b["x"].dtype
        (['x', 'y'], torch.int64)
    """
    return load(max_bytes).batches(split, batch_size, seq_len, generator)


def encode(text: str | bytes) -> torch.Tensor:
    """Text (UTF-8) or bytes to a 1-D int64 tensor of byte ids.

    Example:
        >>> encode("hi").tolist()
        [104, 105]
    """
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.tensor(list(raw), dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    """Byte ids to text; invalid UTF-8 is replaced (``errors="replace"``).

    Example:
        >>> decode(torch.tensor([104, 105]))
        'hi'
    """
    return bytes(ids.reshape(-1).tolist()).decode("utf-8", errors="replace")
