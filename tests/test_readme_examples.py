"""Every ``cltk`` command in the README's bash blocks runs as written, at a tiny size.

The commands are read from README.md itself (fenced ``bash`` blocks, backslash continuations
joined), so examples added later are tested without editing this file. Each ``cltk run`` gets
``smoke=true`` appended (cl_toolkit/smoke.py: two tasks, a few samples, tiny sizes; the same code
paths) plus ``quiet=true threads=1``, and a sweep keeps the first two values of each swept list
(``seed=0,1,2,3,4`` runs seeds 0 and 1), so the test stays bounded; all commands run in order in one scratch directory, so a
``cltk report`` finds the runs before it. A command that needs a download must fail with exit
code 2 and the offline message (the network is cut). A line whose comment says
``[not smoke-tested: REASON]`` is skipped for that reason (a cluster, say).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
APPENDED = ["smoke=true", "quiet=true", "threads=1"]
OFFLINE = re.compile(r"offline|download", re.I)


def readme_commands() -> list[tuple[str, str | None]]:
    """(command line, skip reason or None) of every line starting with ``cltk`` in a bash
    block; a marker on the comment line just above applies too."""
    out, pending_reason = [], None
    text = README.read_text()
    for body in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", body)
        for line in joined.splitlines():
            marker = re.search(r"\[not smoke-tested: ([^\]]+)\]", line)
            if line.lstrip().startswith("#"):
                pending_reason = marker.group(1) if marker else None
                continue
            if line.strip().startswith("cltk "):
                reason = marker.group(1) if marker else pending_reason
                out.append((line.strip(), reason))
            pending_reason = None
    return out


COMMANDS = readme_commands()


def _first_two(arg: str) -> str:
    """``key=a,b,c`` -> ``key=a,b`` (a swept override; lists in brackets are left alone)."""
    key, eq, value = arg.partition("=")
    if not eq or arg.startswith("-") or "[" in value or "{" in value:
        return arg
    return f"{key}={','.join(value.split(',')[:2])}"


def test_readme_has_commands():
    assert len(COMMANDS) >= 15 and any(c.startswith("cltk report") for c, _ in COMMANDS)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("line,reason", COMMANDS, ids=[c[:60] for c, _ in COMMANDS])
def test_readme_example_runs_as_written(line, reason, scratch, monkeypatch, capsys):
    from cl_toolkit.cli import main

    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(scratch)
    monkeypatch.setenv("PWD", str(scratch))
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("CLTK_DATA", str(scratch / "data"))
    argv = [a.replace("$PWD", str(scratch)) for a in shlex.split(line, comments=True)[1:]]
    if "-m" in argv or "--multirun" in argv:
        argv = [_first_two(a) for a in argv]
    if argv and argv[0] == "run" and "--help" not in argv:
        keys = {a.split("=", 1)[0].lstrip("+~") for a in argv}
        argv += [a for a in APPENDED if a.split("=")[0] not in keys]
    code = main(argv)
    captured = capsys.readouterr()
    if code == 2 and OFFLINE.search(captured.err) and "error: " in captured.err:
        return  # needs a download: it failed at once with the offline message
    assert code == 0, f"{line}\n{captured.out[-2000:]}\n{captured.err[-3000:]}"
