"""Helpers for tests that start their own `ray start` nodes: free ports, a session's processes, stopping a session,
what a process tree listens on, this machine's non-loopback address."""

from __future__ import annotations

import ipaddress
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

# Ports handed out here lie below Linux's ephemeral range (32768-60999) and above Ray's worker ports (10002-19999):
# a port picked from the ephemeral range can be taken by any process's next outgoing or port-0 socket (a Ray
# worker of the session's Ray starting, say) before the server it was picked for binds it.
PORT_RANGE = (20000, 32768)
_handed: set[int] = set()


def _share() -> tuple[int, int]:
    """PORT_RANGE, or under xdist this worker's own slice of it (two workers never hand out the same port)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw"):
        return PORT_RANGE
    size = (PORT_RANGE[1] - PORT_RANGE[0]) // count
    low = PORT_RANGE[0] + int(worker[2:]) * size
    return low, low + size


def free_port() -> int:
    """A TCP port that is free now on every interface, never handed out before in this process."""
    rng = random.Random()
    for _ in range(2000):
        port = rng.randrange(*_share())
        if port in _handed:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {_share()}")


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


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it (a local Ray's GCS, raylet, agents and workers descend from its driver)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(children.get(current, []))
    return found


def _ip(hex_address: str) -> str:
    """An address of /proc/net/tcp{,6} (little-endian 32-bit words, hex) in dotted or colon form."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words)


def listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket that one of `pids` listens on (from /proc, no `ss` needed)."""
    owner: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[int(link[8:-1])] = pid
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in owner:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.append((_ip(address), int(port, 16), owner[int(fields[9])]))
    return found


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback (::ffff:127.0.0.1)."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def outward_address() -> str | None:
    """This machine's first non-loopback IPv4 address (where other machines reach it), or None if it has none."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.254.254.254", 9))  # a UDP connect sends nothing: it only picks the outward interface
            address = sock.getsockname()[0]
        if not is_loopback(address):
            return str(address)
    except OSError:
        pass
    try:
        names = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return next((a for a in names if ":" not in a and not is_loopback(a)), None)
