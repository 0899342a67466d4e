"""The fortunes corpus loader, byte tokenizer and language-modelling stream, against
hand-written strfile files."""
import pytest
import torch

from cl_toolkit.benchmarks import fortunes as F
from cl_toolkit.errors import DatasetNotFoundError

HAND_WRITTEN = b"""A day for firm decisions!!!!!  Or is it?
%
A long-forgotten loved one will appear soon.

Buy the negatives at any price.
%
%
   50% off:
\tall quotes %
%
"""


def test_parser_splits_at_lines_holding_only_a_percent_sign():
    assert F.parse_fortunes(HAND_WRITTEN) == [
        b"A day for firm decisions!!!!! Or is it?",
        b"A long-forgotten loved one will appear soon. Buy the negatives at any price.",
        b"50% off: all quotes %",
    ]
    assert F.parse_fortunes(b"no separator at all\n") == [b"no separator at all"]
    assert F.parse_fortunes(b"%\n%\n") == []


def test_byte_tokens_round_trip():
    ids = F.encode("café %")
    assert ids.dtype == torch.long and ids.tolist() == [99, 97, 102, 195, 169, 32, 37]
    assert F.decode(ids) == "café %"


def test_windows_are_next_byte_pairs():
    data = F.lm_windows([b"abc", b"de"], seq_len=2)  # "abc\nde": 2 windows of 3 bytes
    assert data.x.tolist() == [[97, 98], [99, 10]]
    assert data.y.tolist() == [[98, 99], [10, 100]]
    assert len(F.lm_windows([b"abcdefghij"], seq_len=2, limit=3)) == 3


def corpus(root, files=("a", "b"), n=200):
    root.mkdir(exist_ok=True)
    for name in files:
        quotes = [f"Quotation {i} of {name}: the quick brown fox jumps." for i in range(n)]
        (root / name).write_text("\n%\n".join(quotes) + "\n%\n")
        (root / f"{name}.dat").write_bytes(b"\x00\x01")  # strfile index: not a corpus file
    return root


def test_stream_has_one_task_per_file_and_never_trains_on_held_out_quotations(tmp_path):
    root = corpus(tmp_path / "c")
    stream = F.fortunes(files=["a", "b"], path=str(root), seq_len=16, max_train=None,
                        max_test=None)
    assert [t.name for t in stream] == ["fortunes/a", "fortunes/b"]
    assert stream.vocab_size == 256 and stream.describe()["vocab_size"] == 256
    quotes = F.load_quotations(root)
    assert sorted(quotes) == ["a", "b"]
    splits = [F.split_of(q) for q in quotes["a"]]
    assert 0 < splits.count("probe") < 30 and 0 < splits.count("test") < 30
    train_text = bytes(stream[0].train.x.flatten().tolist()) + \
        bytes(stream[0].train.y[-1:, -1].tolist())
    train = [q for q in quotes["a"] if F.split_of(q) == "train"]
    assert all(q not in train_text for q in quotes["a"] if F.split_of(q) != "train")
    assert sum(q in train_text for q in train) >= len(train) - 1  # the last may be cut short
    probe = F.probe_sequences(20, root, ["a", "b"])
    assert probe.shape[1] == 20
    held_out = {q[:20] for qs in quotes.values() for q in qs if F.split_of(q) == "probe"}
    assert {bytes(r.tolist()) for r in probe} == held_out


def test_missing_corpus_and_files_say_how_to_get_them(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install fortunes.*benchmark.path"):
        F.fortunes(path=str(tmp_path / "nowhere"))
    root = corpus(tmp_path / "c")
    with pytest.raises(DatasetNotFoundError, match="'wisdom'.*available: a, b.*files"):
        F.fortunes(files=["wisdom"], path=str(root))
