"""perf/mom_cpu_step.py: the table's plumbing on the CPU (one step per row)."""
import re

import torch

from perf import mom_cpu_step


def test_table_has_every_row_and_the_transformer_ratio(capsys):
    mom_cpu_step.main(["--sizes", "split_digits", "--repeats", "1",
                       "--variants", "mom task-free 2/task top-1", "torch TransformerEncoder",
                       "mom shared, fla"])
    out = capsys.readouterr().out
    assert "single-task batches" in out
    rows = [r for r in out.splitlines() if r.startswith("| split_digits")]
    names = [r.split("|")[2].strip() for r in rows]
    assert names == ["transformer", "mom task-free 2/task top-1", "torch TransformerEncoder",
                     "mom shared, fla"]
    assert rows[0].endswith("| 1.00x |")
    params = [int(r.split("|")[4].strip().replace(",", "")) for r in rows[:3]]
    # the evidence's routed row and the plain torch encoder match the transformer preset
    assert max(params) / min(params) < 1.001, params
    ms, ratio = re.search(r"\| ([\d.]+) \| ([\d.]+)x \|$", rows[1]).groups()
    assert float(ms) > 0 and float(ratio) > 0
    # fla is not installed on the dev machine: the row says so instead of failing.
    assert "n/a (ModuleNotFoundError" in rows[3] or re.search(r"\d+x \|$", rows[3])


def test_torch_encoder_is_a_plain_transformer_encoder_of_the_target_size():
    kw = {"hidden_size": 64, "num_heads": 2, "num_layers": 2}
    enc = mom_cpu_step.torch_encoder((1, 8, 8), kw, target=166_000)
    assert isinstance(enc.encoder, torch.nn.TransformerEncoder)
    # hand count: embed 4*64+64, pos 16*64, per layer 4*64*64+4*64 (attention)
    # + 2*64*ff + ff + 64 (feed-forward) + 4*64 (norms)
    ff = enc.encoder.layers[0].linear1.out_features
    hand = 320 + 1024 + 2 * (16384 + 256 + 129 * ff + 64 + 256)
    assert sum(p.numel() for p in enc.parameters()) == hand
    assert abs(hand - 166_000) <= 129 * 2  # the nearest feed-forward width
    assert enc(torch.zeros(3, 1, 8, 8)).shape == (3, 64)
