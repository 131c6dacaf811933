"""Helpers for tests that start their own `ray start` nodes: free ports, a session's processes, stopping a session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def session_members(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose session id is `sid` (all that a `ray start` in its own session
    spawned, workers included)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            found.append((int(stat.parent.name), cmd))
    return found


def stop_session(proc: subprocess.Popen[bytes], timeout: float, grace: float = 0.0) -> None:
    """SIGTERM the blocking `ray start` (it drains and stops its node), wait up to `grace` s for its session to
    exit, then SIGKILL what is left of it. Only this session is touched: no `ray stop`, which would end every Ray
    on the machine."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + grace
    while grace and session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid, _ in session_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
