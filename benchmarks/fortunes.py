"""Debian's ``fortunes`` corpus (English quotations) as a byte-level language-modelling stream.

The corpus files (``apt-get install fortunes``: /usr/share/games/fortunes/) hold quotations
separated by lines with a single ``%`` (the strfile format). Tokens are UTF-8 bytes, so the
vocabulary is 256 ids and encoding is deterministic with nothing to train or download.

Every quotation falls in one of 20 buckets by the CRC32 of its text, a split that depends neither
on the seed nor on which files a stream reads: bucket 0 is held out for memory probes (study
sentences and foils that no stream trains on, see cl_toolkit/probes/retention.py), bucket 1 is the test
split and the rest is training text.
"""
from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Sequence

import torch

from cl_toolkit.errors import ConfigError, DatasetNotFoundError
from cl_toolkit.stream import Task, TaskStream, TensorData
from cl_toolkit.validation import at_least

DEFAULT_PATH = "/usr/share/games/fortunes"
DEFAULT_FILES = ("wisdom", "science", "people")
VOCAB_SIZE = 256
SEPARATOR = b"\n"
_BUCKETS = {0: "probe", 1: "test"}
# The text of every byte (for pretrained LMs, cl_toolkit/models/hf_lm.py): its character, byte 0
# (padding) empty, bytes >= 128 as Latin-1 characters (one per byte, so a multi-byte UTF-8
# character shows as its bytes; rare in the corpus: our choice).
TOKEN_TEXT = ("",) + tuple(chr(b) for b in range(1, VOCAB_SIZE))


def encode(text: str | bytes) -> torch.Tensor:
    """Token ids ``[L]`` (int64): the UTF-8 bytes of ``text``."""
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def decode(ids: torch.Tensor | Sequence[int]) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def parse_fortunes(raw: bytes) -> list[bytes]:
    """Quotations of one strfile text, whitespace runs collapsed to one space, empty ones
    dropped."""
    quotes = re.split(rb"(?m)^%[ \t]*\r?$\n?", raw)
    quotes = (re.sub(rb"\s+", b" ", q).strip() for q in quotes)
    return [q for q in quotes if q]


def split_of(quote: bytes) -> str:
    """'probe', 'test' or 'train': fixed by the quotation's text."""
    return _BUCKETS.get(zlib.crc32(quote) % 20, "train")


def load_quotations(path: str | Path = DEFAULT_PATH, files: Sequence[str] | None = None
                    ) -> dict[str, list[bytes]]:
    """``{file name: quotations}`` for ``files`` (None: every corpus file of ``path``)."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"No fortunes corpus at {root}. Install it with `apt-get install fortunes` (Debian/"
            "Ubuntu), or point the path key (benchmark.path / probe.path) at a directory of "
            "strfile files (quotations separated by lines holding a single %)."
        )
    if files is None:
        files = sorted(p.name for p in root.iterdir() if p.is_file() and "." not in p.name)
    out = {}
    for name in files:
        f = root / name
        if not f.is_file():
            have = sorted(p.name for p in root.iterdir() if p.is_file() and "." not in p.name)
            raise DatasetNotFoundError(
                f"The fortunes file {name!r} is not in {root}; available: {', '.join(have)}. "
                "Fix the files key (benchmark.files / probe.files)."
            )
        out[name] = parse_fortunes(f.read_bytes())
    return out


def lm_windows(quotes: Sequence[bytes], seq_len: int, limit: int | None = None) -> TensorData:
    """Quotations joined by newlines and cut into non-overlapping windows of ``seq_len + 1``
    bytes: inputs ``x`` ``[N, seq_len]``, next-byte targets ``y`` ``[N, seq_len]``."""
    ids = encode(SEPARATOR.join(quotes))
    n = (len(ids) - 1) // seq_len
    if limit is not None:
        n = min(n, int(limit))
    if n < 1:
        raise ConfigError(f"fortunes: {len(ids)} bytes of text cannot fill one window of "
                          f"seq_len={seq_len} + 1; lower benchmark.seq_len or add files.")
    w = ids[: n * seq_len + 1]
    return TensorData(w[:-1].view(n, seq_len), w[1:].view(n, seq_len))


def fortunes(files: Sequence[str] = DEFAULT_FILES, path: str = DEFAULT_PATH, seq_len: int = 64,
             max_train: int | None = 2000, max_test: int | None = 128, seed: int = 0
             ) -> TaskStream:
    """One next-byte prediction task per fortunes file (domain-incremental: the vocabulary is
    shared, the text shifts from one collection of quotations to the next)."""
    if seq_len < 2:
        raise ConfigError(f"benchmark.seq_len must be at least 2; got {seq_len}.")
    corpus = load_quotations(path, files)
    tasks = []
    for i, (name, quotes) in enumerate(corpus.items()):
        train = [q for q in quotes if split_of(q) == "train"]
        test = [q for q in quotes if split_of(q) == "test"]
        tasks.append(Task(index=i, name=f"fortunes/{name}", classes=(),
                          train=lm_windows(train, seq_len, max_train),
                          test=lm_windows(test, seq_len, max_test)))
    return TaskStream(name="fortunes", tasks=tasks, scenario="domain-il",
                      num_classes=VOCAB_SIZE, input_shape=(seq_len,), seed=seed,
                      info={"tokenizer": "utf-8 bytes", "files": list(corpus)},
                      vocab_size=VOCAB_SIZE, token_text=TOKEN_TEXT)


def probe_quotations(path: str | Path = DEFAULT_PATH,
                     files: Sequence[str] | None = DEFAULT_FILES) -> list[bytes]:
    """The held-out quotations (split 'probe', in no stream's training or test text), whole,
    without duplicates, in corpus order (``files=None``: every corpus file of ``path``)."""
    seen, out = set(), []
    for quotes in load_quotations(path, files).values():
        for q in quotes:
            if split_of(q) == "probe" and q not in seen:
                seen.add(q)
                out.append(q)
    return out


def probe_sequences(length: int, path: str | Path = DEFAULT_PATH,
                    files: Sequence[str] | None = DEFAULT_FILES) -> torch.Tensor:
    """The held-out quotations of at least ``length`` bytes, cut to their first ``length`` bytes,
    without duplicates, in corpus order: ``[N, length]`` int64."""
    seen, rows = set(), []
    for q in probe_quotations(path, files):
        head = q[:length]
        if len(head) == length and head not in seen:
            seen.add(head)
            rows.append(encode(head))
    if not rows:
        raise ConfigError(f"No held-out fortunes of {length} bytes in {path} ({files}); lower "
                          "probe.length or add files.")
    return torch.stack(rows)


def vocabulary(path: str | Path = DEFAULT_PATH,
               files: Sequence[str] | None = DEFAULT_FILES) -> list[bytes]:
    """The distinct words (runs of non-space bytes) of the training quotations of ``files``,
    sorted: what the memory probe draws its ``random_words`` stimuli from."""
    words = set()
    for quotes in load_quotations(path, files).values():
        for q in quotes:
            if split_of(q) == "train":
                words.update(q.split())
    return sorted(words)


fortunes.task_kind = "tokens"  # what the stream holds, known before it is built (see validation)
fortunes.ranges = {"seq_len": at_least(2), "max_train": at_least(1), "max_test": at_least(1)}
fortunes.smoke = {"max_train": 16, "max_test": 8}
