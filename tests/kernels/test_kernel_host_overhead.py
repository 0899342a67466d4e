"""perf/kernel_host_overhead.py runs (in a subprocess: it stubs the kernels out of
the module for the whole process) and prints one positive time per call kind."""
import subprocess
import sys


def test_prints_a_time_per_call_kind():
    proc = subprocess.run([sys.executable, "-m", "perf.kernel_host_overhead",
                           "--calls", "3", "--repeats", "1"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(" | ") for line in proc.stdout.splitlines()
            if line.startswith("| gated")]
    assert len(rows) == 4
    assert all(float(r[-1].rstrip(" |")) > 0 for r in rows)
