"""perf/kcl_memory_curve.py: the interpolation of KCL's curve at GKCL's bytes, and an
end-to-end --smoke run that writes one JSON per run, resumes, and refuses a mixed protocol."""
import math

import pytest

from perf import kcl_memory_curve as curve
from cl_toolkit.errors import ConfigError


def test_kcl_at_interpolates_in_log_bytes():
    pts = [(4.0, 70.0), (1.0, 50.0), (16.0, 72.0)]
    assert curve.kcl_at(pts, 2.0) == pytest.approx(60.0)  # log-midpoint of 1 and 4
    assert curve.kcl_at(pts, 8.0) == pytest.approx(71.0)
    w = math.log(3.0) / math.log(4.0)
    assert curve.kcl_at(pts, 3.0) == pytest.approx(50.0 + 20.0 * w)
    assert curve.kcl_at(pts, 0.5) is None and curve.kcl_at(pts, 17.0) is None


def test_smoke_writes_runs_resumes_and_refuses_another_protocol(fashion_root, tmp_path, capsys):
    curve.main(["--out", str(tmp_path), "--smoke"])
    runs = sorted(p.name for p in tmp_path.glob("run_*.json"))
    assert len(runs) == 3  # coresets 1 and 5, the small generator
    assert (tmp_path / "memory_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "memory_curve.md").read_text()
    rows = [r.split(" | ") for r in table.splitlines() if r.startswith("| kcl") or
            r.startswith("| gkcl")]
    assert [r[0] for r in rows] == ["| kcl", "| kcl", "| gkcl"]
    mib = [float(r[3]) for r in rows]
    assert mib[0] * 5 == pytest.approx(mib[1], rel=0.01)  # coresets are 1 and 5 per class
    capsys.readouterr()

    curve.main(["--out", str(tmp_path), "--smoke"])
    assert capsys.readouterr().out.count("done before, skipped") == 3
    with pytest.raises(ConfigError, match="another --out folder"):
        curve.main(["--out", str(tmp_path), "--tasks", "3", "--coresets", "1", "--generators", ""])
