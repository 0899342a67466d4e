"""perf/decode_step_cpu.py: the table's plumbing (one tiny decode per row)."""
import re

from perf import decode_step_cpu


def test_table_has_a_row_per_preset_with_both_loops(capsys):
    decode_step_cpu.main(["--batch", "2", "--steps", "1", "--repeats", "1"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "_lm" in r]
    assert [r.split("|")[1].strip() for r in rows] == list(decode_step_cpu.MODELS)
    for row in rows[:3]:
        assert re.search(r"\| [\d.]+ \| [\d.]+ \| [\d.]+x \|$", row), row
    assert "(no recurrence)" in rows[3]
