"""perf/kcl_vs_avalanche.py runs end to end (--smoke) and prints one table row per
method, with Avalanche's Replay buffer at KCL's memory in bytes."""
import pytest

pytest.importorskip("avalanche")


def test_smoke_prints_the_table(fashion_root, capsys):
    from perf import kcl_vs_avalanche

    kcl_vs_avalanche.main(["--smoke"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and "---" not in line]
    header, body = rows[0], {r[0].lstrip("| "): r for r in rows[1:]}
    assert header[1:4] == ["memory (bytes)", "ACC (%)", "BWT (%)"]
    assert len(body) == 5
    memory = {name: int(r[1].replace(",", "")) for name, r in body.items()}
    kcl = next(m for name, m in memory.items() if name.startswith("kcl "))
    replay = [m for name, m in memory.items() if name.startswith("avalanche Replay ")]
    assert kcl > 0 and replay == [kcl, kcl]  # single head and multi-head
    assert all(m > 0 for m in memory.values())
    for r in body.values():
        assert 0 <= float(r[2]) <= 100
