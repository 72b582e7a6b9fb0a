"""One training run per workdir: a lock file naming its holder (host, pid, Slurm job).

A second run on the same workdir (a double ``sbatch`` with the same WORKDIR) refuses at once
with one line naming the holder. A lock whose holder is gone does not block: on the holder's
host, its process has ended (or its pid now belongs to another process); on another host, its
Slurm job is no longer running per ``squeue``/``scontrol``, or it was an earlier run of this
very job (a requeue keeps the job id and raises ``SLURM_RESTART_COUNT``). When nothing can tell
(another host, no Slurm tools), the lock blocks and the message says which file to delete.

Only one process of a multi-process job takes the lock (process 0, ``owner=True``); the others
hold a no-op lock. The file is created complete and atomically (a hard link of a written
temporary file), so a reader never sees half a lock.
"""

import dataclasses
import datetime
import json
import logging
import os
import shutil
import socket
import subprocess
import uuid

from jaxmm import paths
from jaxmm.errors import UserError

log = logging.getLogger("jaxmm")

# Slurm job states in which the job's processes may still be running.
_LIVE_STATES = ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "RESIZING",
                "SIGNALING", "STAGE_OUT")


class WorkdirLockedError(UserError, BlockingIOError):
    """Another live training run holds the workdir (an OSError, like a refused file lock)."""


@dataclasses.dataclass
class Holder:
    """Who holds a lock, as written in the lock file."""

    host: str
    pid: int
    pid_start: str | None = None  # Process start time (Linux), to tell a reused pid.
    job_id: str | None = None  # SLURM_JOB_ID
    restart: int = 0  # SLURM_RESTART_COUNT
    since: str = ""
    token: str = ""

    def describe(self) -> str:
        job = f", Slurm job {self.job_id}" if self.job_id else ""
        return f"host {self.host}, pid {self.pid}{job}, since {self.since}"


def _pid_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # Field 22: start time in ticks.
    except (OSError, IndexError):
        return None


def this_process() -> Holder:
    """The holder record of the calling process."""
    return Holder(host=socket.gethostname(), pid=os.getpid(), pid_start=_pid_start(os.getpid()),
                  job_id=os.environ.get("SLURM_JOB_ID") or None,
                  restart=int(os.environ.get("SLURM_RESTART_COUNT") or 0),
                  since=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  token=uuid.uuid4().hex)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Alive, owned by someone else.
        return True
    return True


def slurm_job_state(job_id: str) -> str | None:
    """The Slurm state of a job ("RUNNING", ...), "GONE" when Slurm no longer knows it, or None
    when it cannot be asked (no ``squeue``/``scontrol``, no controller)."""
    for cmd in (["squeue", "-h", "-j", job_id, "-o", "%T"], ["scontrol", "show", "job", job_id]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = out.stdout + out.stderr
        if "Invalid job id" in text:
            return "GONE"
        if out.returncode != 0:
            continue
        if cmd[0] == "squeue":
            return out.stdout.split()[0] if out.stdout.split() else "GONE"
        for field in out.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
    return None


def stale_reason(holder: Holder, me: Holder) -> str | None:
    """Why the holder of a lock is gone, or None when it may still be running."""
    if holder.host == me.host:  # The process table decides.
        if not _pid_alive(holder.pid):
            return f"process {holder.pid} has ended"
        if holder.pid_start and _pid_start(holder.pid) not in (None, holder.pid_start):
            return f"pid {holder.pid} now belongs to another process"
        return None
    if holder.job_id and holder.job_id == me.job_id:
        if holder.restart < me.restart:
            return f"Slurm job {holder.job_id} was requeued (restart {me.restart})"
        return None
    if holder.job_id:
        state = slurm_job_state(holder.job_id)
        if state is not None and state not in _LIVE_STATES:
            return f"Slurm job {holder.job_id} is {state.lower()}"
    return None


# The type of every field of a lock file (a pid that is not a number is a damaged file).
_FIELD_TYPES = {"host": str, "pid": int, "pid_start": (str, type(None)),
                "job_id": (str, type(None)), "restart": int, "since": str, "token": str}


def read_holder(path: str) -> Holder | None:
    """The holder recorded in a lock file; None when the file is missing, unreadable or
    damaged (a field of the wrong type, a pid that is not a positive number)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        holder = Holder(**{k.name: record[k.name] for k in dataclasses.fields(Holder)
                           if k.name in record})
    except (OSError, ValueError, TypeError):
        return None
    for name, kind in _FIELD_TYPES.items():
        value = getattr(holder, name)
        if isinstance(value, bool) or not isinstance(value, kind):
            return None
    return holder if holder.pid > 0 else None


class WorkdirLock:
    """Context manager holding ``<workdir>/train.lock`` for one training run.

    Args:
      workdir: the training workdir (created if needed).
      owner: whether this process takes the lock (process 0 of a job); others do nothing.
    """

    def __init__(self, workdir: str, owner: bool = True):
        self.path = os.path.join(workdir, paths.LOCK_FILE)
        self.workdir = workdir
        self.owner = owner
        self.me = this_process()
        self.held = False

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one.

        Raises:
          WorkdirLockedError: one line naming the live (or undecidable) holder.
        """
        if not self.owner or self.held:
            return
        os.makedirs(self.workdir, exist_ok=True)
        for _ in range(3):  # A lock released or taken over between our reads: look again.
            if self._create():
                self.held = True
                return
            holder = read_holder(self.path)
            if holder is None:
                if os.path.exists(self.path):
                    raise WorkdirLockedError(
                        f"{self.workdir} is locked by {self.path}, which cannot be read; "
                        f"delete it if no training run uses this workdir")
                continue
            reason = stale_reason(holder, self.me)
            if reason is None:
                raise WorkdirLockedError(
                    f"{self.workdir} is in use by another training run ({holder.describe()}); "
                    f"wait for it to end or cancel it; if it is gone, delete {self.path}")
            log.warning("taking over the lock of %s: the run that held it is gone (%s; %s)",
                            self.workdir, holder.describe(), reason)
            self._remove_if(holder.token)
        raise WorkdirLockedError(f"{self.workdir}: could not take {self.path}; other runs "
                                 f"keep taking it")

    def _create(self) -> bool:
        record = json.dumps(dataclasses.asdict(self.me), indent=1)
        tmp = f"{self.path}.{self.me.token}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(record)
        try:
            os.link(tmp, self.path)  # Atomic, and fails when the lock exists.
            return True
        except FileExistsError:
            return False
        except OSError:  # A file system without hard links: exclusive create instead.
            return self._create_exclusive(record)
        finally:
            os.remove(tmp)

    def _create_exclusive(self, record: str) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(record)
        return True

    def _remove_if(self, token: str) -> None:
        # Renamed first, so a lock that a live run took in between is put back untouched.
        aside = f"{self.path}.{self.me.token}.old"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = read_holder(aside)
        if moved is None or moved.token != token:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        os.remove(aside)

    def release(self) -> None:
        """Removes the lock file if this process holds it."""
        if self.held:
            self._remove_if(self.me.token)
            self.held = False

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
