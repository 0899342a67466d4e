"""The issue-25 speed script runs at a toy size and reports what it says it reports."""
from __future__ import annotations

import json

from perf import gdkvm_speed


def test_speed_script_times_the_four_models_and_the_memories_by_clip_length(tmp_path, capsys):
    out = gdkvm_speed.main(["--size", "8", "--frames", "2", "--hidden", "4", "--heads", "1",
                            "--lengths", "2", "4", "--repeats", "1",
                            "--json", str(tmp_path / "s.json")])
    assert set(out["fps"]) == {"gdkvm", "linear_kvm", "stm", "frame_unet"}
    assert all(r["fps"] > 0 for r in out["fps"].values())
    assert len({r["params"] for r in out["fps"].values()}) == 1       # equal parameters
    short, long_ = out["memory"]
    # a d x d state per head (4 bytes each) whatever T; STM keeps T frames of 4 tokens' k and v
    assert short["gdkvm_bytes"] == long_["gdkvm_bytes"] == 4 * 4 * 4
    assert (short["stm_bytes"], long_["stm_bytes"]) == (2 * 4 * 2 * 4 * 4, 4 * 4 * 2 * 4 * 4)
    assert long_["stm_over_gdkvm_bytes"] == 2 * short["stm_over_gdkvm_bytes"]
    assert "| stm / gdkvm time |" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["size"] == 8
