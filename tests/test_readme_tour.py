"""The README's tour prints what the commands print today: every `$ command` of its console
blocks is run, in order and in one shell, against the demo (`nbiafs demo --names readable`), and
its output compared with the README's. Outputs of `nbiafs` itself (times, rates, ports, paths,
counts) are compared with every number and absolute path masked; the others exactly."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need, start_demo

pytestmark = pytest.mark.mount
README = Path(__file__).resolve().parent.parent / "README.md"
MARK = "@@nbiafs-tour@@"


def tour_commands() -> list[tuple[str, list[str]]]:
    """[(command, expected output lines)] of the console blocks of README's "A tour"."""
    text = README.read_text()
    section = text[text.index("## A tour"):]
    section = section[:section.index("\n## ", 1)]
    out: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                out.append((line[2:], []))
            else:
                out[-1][1].append(line)
    return out


def masked(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        line = re.sub(r"(?<![\w.])/[^\s,]+", "PATH", line)
        line = re.sub(r"http://\S+", "URL", line)
        line = re.sub(r"#+|\.+(?=\])", "BAR", line)
        out.append(re.sub(r"\d+(\.\d+)*", "N", " ".join(line.split())))
    return out


def on_screen(text: str) -> list[str]:
    """What a terminal shows of output that redraws its line with carriage returns."""
    return [line.split("\r")[-1] for line in text.replace("\r\n", "\n").split("\n")]


def test_the_readme_tour(tmp_path, nbia_archive_data):
    need("getfattr"), need("file"), need("script")
    commands = tour_commands()
    assert len(commands) >= 6
    mnt = tmp_path / "nbia-demo"
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "LC_ALL": "C.UTF-8", "TZ": "UTC"}
    demo = start_demo(mnt, nbia_archive_data, "--names", "readable", env=env, cwd=tmp_path,
                      stdout=subprocess.DEVNULL)
    try:
        script = []
        for k, (command, _) in enumerate(commands):
            if command.startswith("nbiafs "):  # on a terminal, as the README shows it
                command = f"script -qec {shlex.quote(command)} /dev/null"
            script.append(f"echo '{MARK}{k}'\n{command}")
        res = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        outputs = re.split(rf"{MARK}\d+\n", res.stdout)[1:]
        assert len(outputs) == len(commands)
        for (command, expected), output in zip(commands, outputs):
            shown = [line for line in on_screen(output) if line.strip()] if command.startswith("nbiafs ") \
                else output.rstrip("\n").split("\n") if output else []
            if command.startswith("nbiafs "):
                shown = [line for line in shown if not line.startswith("[") or "100.0%" in line]  # the bar at its end
                ok = masked(shown) == masked(expected)
            else:
                ok = shown == expected
            if not ok:  # with what the tour and the demo said
                demo.send_signal(signal.SIGINT)
                raise AssertionError((command, shown, expected, res.stderr, demo.communicate(timeout=30)[1][-3000:]))
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
            demo.communicate(timeout=30)
