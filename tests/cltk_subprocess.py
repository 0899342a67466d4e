"""Run the `cltk` command in a subprocess, as a user would, and fail with its output."""
import os
import subprocess
import sys


def cltk(*args, cwd, env=None, timeout=240, check=True):
    proc = subprocess.run([sys.executable, "-m", "cl_toolkit.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"cltk {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
