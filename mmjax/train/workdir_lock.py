"""One writer per workdir: `mmjax train` holds `<workdir>/mmjax.lock` while it runs.

    lock = WorkdirLock(workdir).acquire(log=print)   # WorkdirLockedError when another run holds it
    ...
    lock.release()

The lock file is created atomically (`os.open(O_CREAT | O_EXCL)`: of two runs started at once
exactly one creates it) and holds JSON
    {"host", "pid", "start_time", "heartbeat", "token", "command"}
(times are Unix seconds). A daemon thread rewrites `heartbeat` every `HEARTBEAT_S` seconds
(write to a temporary file, then `os.replace`, so a reader never sees half a file).

A lock whose owner is gone is *stale* and is taken over with a warning, so a preempted or
killed job restarts by itself:
  * same host: the pid no longer exists (`os.kill(pid, 0)` raises ProcessLookupError), or it
    exists but started after the lock was written (the pid was reused; read from /proc where
    there is one);
  * another host: the heartbeat is older than `STALE_AFTER_S` (10 minutes; `MMJAX_LOCK_STALE_S`
    overrides it). A process on another machine cannot be asked whether it is alive, so the
    heartbeat is the only evidence; 10 minutes is 20 missed heartbeats, longer than any pause of
    a healthy run (the heartbeat thread runs beside compilation and checkpoint saves).
What the lock cannot know (a paused-but-alive process on another host whose clock is far off, a
workdir copied with its lock file) `--force-unlock` settles: it takes the lock whatever it says.

Takeover is race-free between two runs that both find the same stale lock: each renames the
stale file to a private name first; only one rename succeeds, and a run whose renamed file turns
out not to be the stale lock it judged (another run took over in between) puts it back and is
refused.

Multi-host jobs: process 0 takes the lock on behalf of the job (`mmjax.train.loop`); the other
processes learn the outcome from it. Read-only commands (`generate`, `export`, `compare`,
`check`) take no lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from mmjax.errors import MmjaxError

LOCK_FILE = "mmjax.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class WorkdirLockedError(MmjaxError):
    """Another run holds the workdir's lock (the CLI prints one line, exit status 2)."""


def stale_after_s() -> float:
    """Seconds after which another host's lock without a heartbeat counts as abandoned."""
    try:
        return float(os.environ.get("MMJAX_LOCK_STALE_S", STALE_AFTER_S))
    except ValueError:
        return STALE_AFTER_S


def read_lock(workdir: str) -> dict[str, Any] | None:
    """The lock's JSON (None when there is no lock; {"unreadable": reason} when it is garbled)."""
    return read_lock_file(os.path.join(workdir, LOCK_FILE))


def read_lock_file(path: str) -> dict[str, Any] | None:
    """`read_lock` of an explicit file path."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        return {"unreadable": str(e)}
    try:
        info = json.loads(text)
        if not isinstance(info, dict):
            raise ValueError("not an object")
        return info
    except ValueError:
        try:
            mtime = os.path.getmtime(path)
        except OSError:
            mtime = 0.0
        return {"unreadable": f"not JSON ({len(text)} bytes)", "mtime": mtime}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _process_start_time(pid: int) -> float | None:
    """Unix start time of `pid` from /proc (Linux), None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat: start time in clock ticks after boot
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def why_stale(info: dict[str, Any], *, now: float | None = None) -> str | None:
    """Why the lock `info` is abandoned, or None when its owner may still be running."""
    now = time.time() if now is None else now
    if "unreadable" in info:
        # an empty or garbled lock: its writer was killed between creating the file and writing
        # it (a moment), or someone edited it. It names no owner; once it is a minute old no
        # writer is still on its way.
        age = now - float(info.get("mtime", now))
        return f"it is unreadable and {age:.0f} s old" if age > 60 else None
    host, pid = info.get("host"), info.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        if not _pid_alive(pid):
            return f"process {pid} no longer exists"
        started = _process_start_time(pid)
        if started is not None and started > float(info.get("start_time", 0)) + 5:
            return f"pid {pid} now belongs to a process started after the lock was taken"
        return None
    beat = float(info.get("heartbeat", info.get("start_time", 0)) or 0)
    limit = stale_after_s()
    if now - beat > limit:
        return f"its heartbeat is {now - beat:.0f} s old (a lock from another host counts as " \
               f"abandoned after {limit:.0f} s)"
    return None


def describe_owner(info: dict[str, Any], *, now: float | None = None) -> str:
    """'pid 123 on host h (started 2026-12-01 17:10:02 UTC, heartbeat 4 s ago)'."""
    if "unreadable" in info:
        return f"an unreadable lock ({info['unreadable']})"
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                            time.gmtime(float(info.get("start_time", 0) or 0)))
    beat = info.get("heartbeat")
    ago = f", heartbeat {now - float(beat):.0f} s ago" if beat is not None else ""
    return f"pid {info.get('pid')} on host {info.get('host')} (started {started}{ago})"


class WorkdirLock:
    """The lock of one workdir, held by this process between `acquire` and `release`."""

    def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self.info: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- acquire ---------------------------------------------------------------------------
    def acquire(self, *, force: bool = False, log: Callable[[str], None] = print) -> "WorkdirLock":
        """Take the lock (taking over a stale one with a warning through `log`).

        Raises WorkdirLockedError naming the owner when another live run holds it."""
        os.makedirs(self.workdir, exist_ok=True)
        for _ in range(5):  # a few rounds: another run may release or take over meanwhile
            if self._create():
                self._start_heartbeat()
                return self
            held = read_lock(self.workdir)
            if held is None:
                continue  # released between our attempt and the read
            reason = "--force-unlock" if force else why_stale(held)
            if reason is None:
                raise WorkdirLockedError(
                    f"workdir {self.workdir} is in use by {describe_owner(held)}; wait for that "
                    f"run to end, use another --workdir, or pass --force-unlock if it is gone "
                    f"(lock file {self.path})")
            if self._take_over(held):
                log(f"warning: took over the lock of {self.workdir} from "
                    f"{describe_owner(held)}: {reason}")
        raise WorkdirLockedError(f"could not lock workdir {self.workdir}: other runs keep "
                                 f"taking {self.path}; try again")

    def _payload(self) -> dict[str, Any]:
        now = time.time()
        if self.info is None:
            import sys

            self.info = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": now,
                         "token": self.token, "command": " ".join(sys.argv)[:500]}
        return {**self.info, "heartbeat": now}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._payload(), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, judged: dict[str, Any]) -> bool:
        """Move the stale lock `judged` out of the way; False when someone else got there."""
        private = f"{self.path}.stale-{self.token}"
        try:
            os.rename(self.path, private)
        except FileNotFoundError:
            return False
        moved = read_lock_file(private)
        if moved != judged:  # not the lock we judged stale: a newer owner's; put it back
            try:
                os.link(private, self.path)  # fails if yet another lock exists meanwhile
            except OSError:
                pass
            os.remove(private)
            return False
        os.remove(private)
        return True

    # --- heartbeat and release -------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="mmjax-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Refresh the heartbeat (only while the file on disk is still ours)."""
        held = read_lock(self.workdir)
        if not held or held.get("token") != self.token:
            return
        tmp = f"{self.path}.tmp-{self.token}"
        try:
            with open(tmp, "w") as f:
                json.dump(self._payload(), f)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a full disk must not kill the run; the heartbeat just ages

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        held = read_lock(self.workdir)
        if held and held.get("token") == self.token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "WorkdirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

