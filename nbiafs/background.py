"""Mounting from Python (notebooks, scripts, tests): `nbiafs.mounted()`.

    import nbiafs, pydicom
    with nbiafs.mounted("~/tcia", collection="LIDC-IDRI", names="readable") as root:
        ds = pydicom.dcmread(next(root.rglob("*.dcm")))

Options are keyword arguments named like the long options of `nbiafs mount`
(`--cache-dir` is `cache_dir=`); flags take True, repeatable options a list.

The mount runs in its own process (`python -m nbiafs mount --foreground`), never in the calling
interpreter: a reader in the caller that holds the GIL while it touches the mount (a page fault
on a memory-mapped file, a C extension reading without releasing the GIL) would otherwise wait
for a server that needs that same lock. The daemon's messages go to a private temporary file
(`Mounted.log()`); a daemon that fails to mount is a `MountFailed` with its one-line message.
The daemon ends with the interpreter that started it: `unmount()`, leaving the `with` block,
interpreter exit (atexit), or, if that interpreter is killed, within a second of its death (the
daemon watches its parent, `NBIAFS_PARENT_PID`).
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 90.0  # negotiation and login are bounded by the client's own budgets
STOP_TIMEOUT_S = 20.0
PARENT_ENV = "NBIAFS_PARENT_PID"
# Set by the mount itself, or not options of a mount in the background.
RESERVED = {"help", "foreground", "mountpoint", "options"}

_live: weakref.WeakSet[Mounted] = weakref.WeakSet()


class MountFailed(RuntimeError):
    """The mount did not come up (or did not go away); the message says why in one line."""


class Mounted:
    """A running `nbiafs mount` daemon at `root`. A context manager: `with` gives `root` and
    unmounts at the end. Without `with`, call `unmount()` (or let the interpreter exit)."""

    def __init__(self, mountpoint: str | os.PathLike, argv: list[str], env: dict | None = None,
                 log_path: Path | None = None, ready_timeout: float = READY_TIMEOUT_S):
        self.root = Path(mountpoint).expanduser().absolute()
        self._created = not self.root.exists()
        if self._created:
            self.root.mkdir(parents=True)
        self._own_log = log_path is None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="nbiafs-mount-", suffix=".log")  # 0600
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        cmd = [sys.executable, "-m", "nbiafs", "mount", str(self.root), "--foreground", *argv]
        child_env = {**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())}
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, env=child_env)
        except OSError as exc:
            self._cleanup()
            raise MountFailed(f"cannot start {sys.executable}: {exc.strerror}") from None
        _live.add(self)
        deadline = time.monotonic() + ready_timeout
        while not os.path.ismount(self.root):
            if self.proc.poll() is not None:
                message = self._failure_line()
                self._cleanup()
                raise MountFailed(message)
            if time.monotonic() > deadline:
                self.unmount()
                raise MountFailed(f"{self.root} was not mounted after {ready_timeout:.0f} s: "
                                  f"{self._failure_line()}")
            time.sleep(0.05)

    # -- as a context manager -------------------------------------------------------------
    def __enter__(self) -> Path:
        return self.root

    def __exit__(self, *exc_info) -> None:
        self.unmount()

    def __repr__(self) -> str:
        return f"<nbiafs mount at {self.root} ({'mounted' if self.mounted else 'not mounted'})>"

    # -- what it is doing ---------------------------------------------------------------
    @property
    def mounted(self) -> bool:
        return self.proc.poll() is None and os.path.ismount(self.root)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def status(self) -> str:
        """The mount's status view (the text of `nbiafs status`)."""
        from nbiafs.status import STATUS_DIR, STATUS_FILE
        return (self.root / STATUS_DIR / STATUS_FILE).read_text()

    def log(self) -> str:
        """What the daemon wrote (its log and messages)."""
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _failure_line(self) -> str:
        lines = [line.strip() for line in self.log().splitlines() if line.strip()]
        for line in reversed(lines):
            if line.startswith("nbiafs: ") or line.startswith("nbiafs mount: "):
                return line.split(": ", 1)[1]
        code = self.proc.poll()
        last = lines[-1] if lines else "no message"
        return f"nbiafs mount exited with status {code}: {last}" if code is not None else last

    # -- ending it ------------------------------------------------------------------------
    def unmount(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Unmount and wait for the daemon to end. A mount still in use (an open file, a shell
        inside it) is detached lazily: it disappears from the tree now and its daemon ends when
        the last file is closed."""
        if self._log.closed:
            return
        _live.discard(self)
        if self.proc.poll() is None and os.path.ismount(self.root):
            result = _unmount(self.root)
            if result is not None and "busy" in result.lower():
                log.warning("%s is in use; detached it (its daemon ends when the last file closes)", self.root)
                _unmount(self.root, lazy=True)
            elif result is not None:
                log.warning("unmounting %s: %s", self.root, result)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if not os.path.ismount(self.root):
                self._cleanup()
                return  # detached and still serving an open file: it ends on its own
            self.proc.terminate()  # libfuse unmounts on SIGTERM
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                _unmount(self.root, lazy=True)
        self._cleanup()

    def _cleanup(self) -> None:
        if not self._log.closed:
            self._log.close()
        if self._own_log:
            try:
                self.log_path.unlink()
            except OSError:
                pass
        if self._created and not os.path.ismount(self.root):
            try:
                self.root.rmdir()
            except OSError:
                pass


def _unmount(path: Path, lazy: bool = False) -> str | None:
    """Ask the kernel to unmount `path`; None when done, else the tool's message."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        cmd = [tool, "-uz" if lazy else "-u", str(path)]
    else:
        cmd = ["umount", *(["-l"] if lazy else []), str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode == 0:
        return None
    return (result.stderr or result.stdout).strip() or f"{cmd[0]} exited with {result.returncode}"


@atexit.register
def _unmount_all() -> None:
    for mount in list(_live):
        try:
            mount.unmount()
        except Exception as exc:  # at exit: report, and go on with the others
            print(f"nbiafs: unmounting {mount.root}: {exc}", file=sys.stderr)


def mount_options() -> dict[str, Any]:
    """keyword -> the argparse action of `nbiafs mount`'s long option of that name."""
    from nbiafs.cli import mount_parser

    options = {}
    for action in mount_parser()._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and action.dest not in RESERVED:
            options[longs[0][2:].replace("-", "_")] = action
    return options


def option_argv(options: dict[str, Any]) -> list[str]:
    """Keyword options as `nbiafs mount` arguments. Unknown names and values of the wrong kind
    are a TypeError here; values are checked by the mount itself (a MountFailed)."""
    known = mount_options()
    argv: list[str] = []
    for name, value in options.items():
        action = known.get(name)
        if action is None:
            raise TypeError(f"unknown nbiafs mount option {name!r}; options: {', '.join(sorted(known))}")
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if action.nargs == 0:  # a flag
            if not isinstance(value, bool):
                raise TypeError(f"{name}= is a flag: pass True or False, not {value!r}")
            if value:
                argv.append(flag)
            continue
        if value is None:
            continue
        many = isinstance(value, (list, tuple, set, frozenset))
        if many and not _repeatable(action):
            raise TypeError(f"{name}= takes one value, not {value!r}")
        for item in (sorted(value) if isinstance(value, (set, frozenset)) else value) if many else [value]:
            argv += [flag, os.fspath(item) if isinstance(item, os.PathLike) else str(item)]
    return argv


def _repeatable(action) -> bool:
    return isinstance(action.default, list)


def mounted(mountpoint: str | os.PathLike, *, password: str | None = None,
            ready_timeout: float = READY_TIMEOUT_S, **options: Any) -> Mounted:
    """Mount the archive at `mountpoint` (created if missing, removed again at unmount) in the
    background and return once it is mounted; raises MountFailed (one line) if it cannot be.

    `options` are those of `nbiafs mount`, as keywords: url="tcia", api="v4", user="me",
    cache_dir="/scratch/nbiafs", cache_size="50G", names="readable", previews=True,
    collection=["LIDC-IDRI"], modality=["CT"], manifest="cart.tcia", no_prefetch=True, …
    `password` (with `user`) reaches the daemon through its environment, never its arguments.
    """
    env = {}
    if password is not None:
        if not options.get("user"):
            raise TypeError("password= needs user=")
        env = {"NBIA_USER": str(options["user"]), "NBIA_PASSWORD": password}
    return Mounted(mountpoint, option_argv(options), env=env, ready_timeout=ready_timeout)


def watch_parent() -> None:
    """In a daemon started by `mounted()`: end (SIGTERM, which libfuse answers by unmounting)
    once the process that started it is gone."""
    text = os.environ.pop(PARENT_ENV, "")
    if not text.isdigit():
        return
    parent = int(text)

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                log.warning("the Python process that mounted this (pid %d) is gone: unmounting", parent)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.5)

    if os.getppid() != parent:
        raise SystemExit(errno.ESRCH)
    threading.Thread(target=watch, name="watch-parent", daemon=True).start()
