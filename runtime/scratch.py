"""What a launch owns outside its output directory goes with it, however it ends.

A launch (``zoplan run``, ``zoplan calibrate``) keeps its host copy of the weights in shared memory
and gives torchrun and the ranks a private temporary directory (torchrun's own log folders land
there). Each is a folder named ``zoplan-*`` holding an ``.owner`` file that the launch keeps locked
(flock) for its lifetime, and removes when it ends. A launch killed with SIGKILL cannot remove
anything; the kernel drops its lock, so the next launch finds the folder unlocked and removes it.
A folder whose lock is held belongs to a live launch and is left alone.

The output directory of a run is locked the same way while a run uses it (``run_lock``): a
second ``zoplan run --resume`` of the same directory is refused instead of training beside it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

from zoplan.errors import Refused, ZoplanError

try:
    import fcntl
except ImportError:  # not on Linux or macOS: folders are still removed at the end, not swept
    fcntl = None  # type: ignore[assignment]

PREFIX = "zoplan-"
OWNER = ".owner"
# a folder this young may be between its creation and its owner's lock: never swept
MIN_AGE_S = 10.0


# the folder host copies live in, when /dev/shm is not the place (a container's small one)
SHARED_MEMORY_ENV = "ZOPLAN_SHARED_MEMORY"
# what a launch writes in shared memory besides the host copies: its owner file, the copy's layout,
# the ranks' meeting pages (each a page, mapped: a write to a full tmpfs is a SIGBUS)
SHARED_MEMORY_ROOM = 1 << 20


def shared_memory() -> Path:
    """Where host copies live: the folder ``ZOPLAN_SHARED_MEMORY`` names, else /dev/shm when it is
    writable, else the temporary directory."""
    chosen = os.environ.get(SHARED_MEMORY_ENV, "")
    if chosen:
        path = Path(chosen).absolute()  # the ranks are handed folders under it
        if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
            raise ZoplanError(
                f"{SHARED_MEMORY_ENV}={chosen} is not a folder this user can write in: it is where the "
                "host copy of the weights would go",
                fix=f"create it, or unset {SHARED_MEMORY_ENV} to use /dev/shm",
            )
        return path
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def mount_point(path: Path) -> Path:
    """The folder that ``path``'s file system is mounted at (what ``df`` names); ``path`` or the
    nearest folder above it that exists."""
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    path = path.resolve()
    device = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == device:
        path = path.parent
    return path


def sizes(*counts: int) -> list[str]:
    """Byte counts in binary units (as ``df -h`` and ``docker run --shm-size`` count), with as many
    decimals as it takes to tell them apart."""
    for decimals in (1, 2, 3):
        said = [
            f"{n / 2**30:.{decimals}f} GiB"
            if n >= 2**30
            else f"{n / 2**20:.{decimals}f} MiB"
            if n >= 2**20
            else f"{n / 2**10:.{decimals - 1}f} KiB"
            for n in counts
        ]
        if len(set(said)) == len(set(counts)):
            break
    return said


def short_of_shared_memory(folder: Path, need: int | None = None, copies: int = 1) -> Refused:
    """The refusal of a launch whose shared memory (``folder``'s file system) has too little room
    for ``need`` bytes (each of ``copies`` host copies; None: for its small files)."""
    where = mount_point(folder)
    free = shutil.disk_usage(where).free
    if need is None:
        files = os.statvfs(where).f_favail
        wanted = f"has too little room left for this launch ({sizes(free)[0]} free" + (
            ", and no file more)" if files == 0 else ")"
        )
        room_gib = 1
    else:
        total = need * copies + SHARED_MEMORY_ROOM
        each = f" ({sizes(need)[0]} for each of {copies} ranks' copies)" if copies > 1 else ""
        said_total, said_free = sizes(total, free)
        wanted = f"is too small for the host copy of the weights: it needs {said_total}{each}, and {said_free} is free"
        room_gib = -(-(total + (64 << 20)) // (1 << 30))  # whole GiB, and room for another launch's pages
    if os.environ.get(SHARED_MEMORY_ENV):
        fix = f"make {where} larger, or point {SHARED_MEMORY_ENV} at a folder on a larger tmpfs; then run again"
    else:
        fix = (
            f"give it more (docker run --shm-size={room_gib}g ...; Kubernetes: an emptyDir with medium Memory "
            f"mounted at /dev/shm), or set {SHARED_MEMORY_ENV} to a folder on a larger tmpfs; then run again"
        )
    container = " (a container's /dev/shm holds 64 MiB unless it is started with more)"
    return Refused(
        f"shared memory in {where} {wanted}" + (container if Path("/dev/shm") in (where, *where.parents) else ""),
        fix=fix,
    )


def shared_memory_is_short(folder: Path, other: Path) -> bool:
    """Whether ``folder``'s file system (a launch's shared memory) is the full one, not ``other``'s
    (its output): what a rank's "no space left" was about."""
    room = os.statvfs(mount_point(folder))
    short = room.f_bavail * room.f_frsize < SHARED_MEMORY_ROOM or room.f_favail == 0  # bytes, or files
    return short and mount_point(folder) != mount_point(other)


def _no_room(base: Path, exc: OSError) -> Exception:
    """What an OSError of making a launch's folder in ``base`` means to the user."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        # a folder that takes no files (/proc, /sys), or one root's access check let through
        where = (
            f"{SHARED_MEMORY_ENV}={base}"
            if os.environ.get(SHARED_MEMORY_ENV) and base == shared_memory()
            else str(base)
        )
        return ZoplanError(
            f"cannot make this launch's scratch folder in {where}: {exc.strerror or exc}",
            fix=f"unset {SHARED_MEMORY_ENV} to use /dev/shm"
            if where.startswith(SHARED_MEMORY_ENV)
            else "set TMPDIR to a folder this user can write in",
        )
    if base == shared_memory():
        return short_of_shared_memory(base)
    return ZoplanError(
        f"{mount_point(base)} has no room left for this launch's scratch folder ({exc.strerror})",
        fix=f"free space in {mount_point(base)}, or set TMPDIR to a folder with room; then run again",
    )


# how long a lock taken for good waits out a probe of it (``held_by``, ``live_launches``: they
# hold it an instant) before the holder counts as another launch
PROBE_PATIENCE_S = 0.5


def _try_lock(fd: int, patience_s: float = 0.0) -> bool:
    if fcntl is None:
        return True
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def abandoned(folder: Path) -> bool:
    """Whether no live launch holds ``folder`` (its owner file's lock is free, or it has none)."""
    try:
        fd = os.open(folder / OWNER, os.O_RDWR)
    except OSError:
        return True
    try:
        return _try_lock(fd)  # (released again when closed)
    finally:
        os.close(fd)


def sweep(base: Path) -> list[Path]:
    """Remove this user's ``zoplan-*`` folders in ``base`` whose owner is gone; return them."""
    removed: list[Path] = []
    if fcntl is None:
        return removed
    try:
        entries = list(base.glob(PREFIX + "*"))
    except OSError:
        return removed
    for folder in entries:
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
            lock = folder / OWNER
            if time.time() - lock.stat().st_mtime < MIN_AGE_S:
                continue
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue  # no owner file (not ours to judge) or gone meanwhile
        try:
            if _try_lock(fd):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        finally:
            os.close(fd)
    return removed


class InUse(ZoplanError):
    """A folder ``owned`` would make exists: another launch holds it (or held it moments ago)."""


@contextlib.contextmanager
def owned(base: Path, name: str) -> Iterator[Path]:
    """A new folder ``base/zoplan-<name>``, locked by this process while the block runs and removed
    after it. Stale folders of dead launches in ``base`` are swept first."""
    sweep(base)
    folder = base / f"{PREFIX}{name}"
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        raise InUse(
            f"{folder} exists: another zoplan launch is using it",
            fix=f"wait for that launch to end; one that was killed leaves it for at most "
            f"{MIN_AGE_S:.0f} s, then the next launch removes it",
        ) from None
    except OSError as exc:  # a full file system (or one out of inodes)
        raise _no_room(base, exc) from None
    try:
        fd = os.open(folder / OWNER, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)  # no owner file: no later launch would sweep it
        raise _no_room(base, exc) from None
    try:
        # Blocking: a probe of another launch (sweep, live_launches) may hold the new folder's
        # lock for an instant, and a launch that went on without it would be taken for a dead one
        # and swept under it.
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            raise _no_room(base, exc) from None
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


@contextlib.contextmanager
def port_claimed(port: int) -> Iterator[None]:
    """Hold ``port`` for this launch (a folder ``zoplan-port-<port>`` in the temporary directory,
    owned while the block runs): two launches given the same --master-port at once each found it
    free, then one's ranks met the other's at it (a rank of one run joined the other's, and both
    failed, each blaming a rank that said nothing)."""
    base, name = Path(tempfile.gettempdir()), f"port-{port}"
    claim = contextlib.ExitStack()
    try:
        claim.enter_context(owned(base, name))
    except InUse:  # (no room to make it: said as owned says it)
        owner = held_by(base / f"{PREFIX}{name}" / OWNER)
        raise ZoplanError(
            f"--master-port {port} is taken by another zoplan launch on this machine"
            + (f" (pid {owner})" if owner else " (or by one stopped in the last few seconds)"),
            fix="give each run its own --master-port, or leave it out on a single machine: a free one is picked",
        ) from None
    with claim:
        yield


# what a launch's folders are named after (owned's ``name``): a calibration's, else a run's
_CALIBRATION_FOLDERS = ("calibrate-",)


def live_launches(own: Iterable[Path] = ()) -> dict[int, str]:
    """The zoplan launches alive now on this machine besides the one holding ``own`` (its
    folders), by pid: "zoplan calibrate" or "zoplan run" (a validation runs one). Found by
    their folders in the temporary directory and in shared memory whose owner lock is held;
    another user's folders cannot be opened, and are not seen."""
    if fcntl is None:
        return {}
    skip = {Path(p).absolute() for p in own}
    found: dict[int, str] = {}
    bases = {Path(tempfile.gettempdir()).absolute()}
    with contextlib.suppress(ZoplanError):  # ZOPLAN_SHARED_MEMORY unusable: the launch will say so
        bases.add(shared_memory().absolute())
    for base in bases:
        try:
            entries = list(base.glob(PREFIX + "*"))
        except OSError:
            continue
        for folder in entries:
            pid = None if folder in skip else held_by(folder / OWNER)  # (None: its launch has ended)
            if pid is not None and pid.isdigit() and int(pid) != os.getpid():
                name = folder.name[len(PREFIX) :].removeprefix("tmp-")
                found[int(pid)] = "zoplan calibrate" if name.startswith(_CALIBRATION_FOLDERS) else "zoplan run"
    return found


def _launches_said(launches: dict[int, str]) -> str:
    """``live_launches``'s answer in words: "zoplan run (pid 12) and zoplan calibrate (pid 34)"."""
    said = [f"{what} (pid {pid})" for pid, what in sorted(launches.items())]
    return said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]


# a measurement on a CPU machine warns when other processes keep this many cores busy
BUSY_CORES_WARNING = 0.5


def before_measuring(verb: str, cpu: bool, own: Iterable[Path] = ()) -> tuple[dict[int, str], str | None]:
    """What runs beside a measurement (``verb``: "calibrate", "validate") about to start: the
    other zoplan launches (``live_launches``), and the warning to give, if any. Either takes part
    of the machine it measures (on a CPU machine, so does any busy process), and its figures would
    be slower than the machine's own."""
    beside = live_launches(own)
    if beside:
        return beside, (
            f"warning: another zoplan launch is running on this machine ({_launches_said(beside)}): what is "
            f"measured beside it is a shared machine's, slower than its own; {verb} when it has ended"
        )
    busy = others_busy_cores() if cpu else None
    if busy is not None and busy >= BUSY_CORES_WARNING:
        return beside, (
            f"warning: other processes keep {busy:.1f} of this machine's {os.cpu_count()} cores busy: a CPU "
            f"measurement measures what they leave, slower than the machine's own; {verb} when it is idle "
            "(`top` shows what runs)"
        )
    return beside, None


def measured_beside(beside: dict[int, str], verb: str, own: Iterable[Path] = ()) -> str | None:
    """The warning after a measurement that ``before_measuring`` started (``beside``, updated
    with the launches alive now): None when no other launch was seen."""
    beside.update(live_launches(own))
    if not beside:
        return None
    return (
        f"warning: this was measured while {_launches_said(beside)} ran on this machine: its figures are a "
        f"shared machine's, slower than its own; {verb} again when nothing else runs"
    )


def others_busy_cores(seconds: float = 0.5) -> float | None:
    """How many cores the machine's other processes kept busy over ``seconds`` (this process
    sleeps meanwhile), from /proc/stat; a virtual machine's stolen time is not counted (no process
    here can free it). None where it cannot be read."""

    def ticks() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        if len(fields) < 5:
            return None
        # user nice system idle iowait irq softirq steal ...
        idle = fields[3] + fields[4] + (fields[7] if len(fields) > 7 else 0)
        return sum(fields[:8]) - idle, sum(fields[:8])

    first = ticks()
    time.sleep(seconds)
    second = ticks()
    if first is None or second is None or second[1] <= first[1]:
        return None
    cores = os.cpu_count() or 1
    return (second[0] - first[0]) / (second[1] - first[1]) * cores


def lock_name(node: int) -> str:
    return f".lock-node{node}"


def held_by(path: Path) -> str | None:
    """The pid written in the lock file ``path`` while a run holds it (None: free, or no such file)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            return None  # (released when closed)
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)


def live_run_in(out: Path) -> str | None:
    """The pid of a live run whose output directory ``out`` is (any of its nodes' locks held), else None."""
    try:
        locks = sorted(out.glob(".lock-node*"))
    except OSError:
        return None
    for lock in locks:
        owner = held_by(lock)
        if owner is not None:
            return owner
    return None


def _open_lock(out: Path, path: Path) -> int:
    """The lock file ``path`` in ``out``, opened (made, with ``out``, where there is none)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as exc:
        if out.exists() and not out.is_dir():  # a file, /dev/null, a link to one
            raise ZoplanError(
                f"the output directory {out} is a file, not a folder", fix="choose another --output, a folder"
            ) from None
        if out.is_symlink() and not out.exists():  # (mkdir says "File exists")
            target = os.readlink(out)
            raise ZoplanError(
                f"the output directory {out} is a link to {target}, which does not exist",
                fix=f"make the folder {target} first, or choose another --output",
            ) from None
        if path.is_file() and out.is_dir() and os.access(out, os.W_OK | os.X_OK):  # the folder is not the cause
            owner = owner_of(path)
            raise ZoplanError(
                f"cannot open the output directory's lock file {path}: {exc.strerror or exc} (it is {owner}'s)",
                fix=f"run as {owner} (whose run this is), or, if no run uses {out}, remove {path}",
            ) from None
        raise ZoplanError(
            f"cannot write into the output directory {out}: {exc.strerror or exc}",
            fix="choose an --output directory this user can write to (and a disk with room)",
        ) from None


def owner_of(path: Path) -> str:
    """The name of the user who owns ``path`` ("another user" where it cannot be told)."""
    try:
        import pwd

        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (OSError, KeyError, ImportError):
        return "another user"


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed, nor replaced)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


@contextlib.contextmanager
def run_lock(out: Path, node: int, nodes: int = 1) -> Iterator[None]:
    """Hold ``out`` for this run. The lock is named by the node (``.lock-nodeN``), so that a node
    of a run over ``nodes`` machines started in another node's directory (one disk they share)
    finds that node's lock held and is refused: every node writes its own run.json, snapshots and
    log, and needs its own output directory."""
    path = out / lock_name(node)
    while True:
        created = not path.exists()
        fd = _open_lock(out, path)
        held = _try_lock(fd, patience_s=PROBE_PATIENCE_S)
        if not held or _same_file(fd, path):
            break
        # a run refused meanwhile removed the lock file it had made (below) after this one had
        # opened it: a lock on it is no one's now (a run that opens the path makes a new file).
        # Lock the file the path names.
        os.close(fd)
    try:
        if not held:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ZoplanError(
                f"{out} is in use by another zoplan run (pid {owner})",
                fix="wait for that run to end (or stop it), or choose another --output",
            )
        for other in range(nodes):
            owner = held_by(out / lock_name(other)) if other != node else None
            if owner is not None:
                raise ZoplanError(
                    f"{out} is the output directory of node {other} of this run (pid {owner} holds it): "
                    "every node writes its own run.json, snapshots and log",
                    fix=f"give each machine its own --output (on a disk they share, say {out.name}-node{node})",
                )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        journal = out / "journal.jsonl"
        journaled = journal.stat().st_size if journal.is_file() else 0
        try:
            yield
        except ZoplanError:
            # a run refused before its first step leaves no file of its own in the user's
            # directory; one that has trained keeps its lock (a failed snapshot, a stop signal:
            # docs/runtime.md, "it stays once a run has started")
            trained = journal.is_file() and journal.stat().st_size > journaled
            if created and not trained:
                path.unlink(missing_ok=True)
            raise
    finally:
        os.close(fd)


def processes_naming(text: str) -> list[int]:
    """Live processes (other than this one) whose command line, or standard output or error,
    mentions ``text``, say a run's directory: what a run left running (a supervisor forked by a
    rank server, and its ranks, carry the server's command line but write to the run's log).
    Linux (/proc); elsewhere none are found."""
    found = []
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else []:
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().split(") ", 1)[1][0]
            except (OSError, IndexError):
                continue
            if state != "Z" and (text in cmdline or any(text in _fd_target(entry, fd) for fd in (1, 2))):
                found.append(int(entry.name))
    return found


def _fd_target(proc_entry: Path, fd: int) -> str:
    try:
        return os.readlink(proc_entry / "fd" / str(fd))
    except OSError:
        return ""


RANK_NAME = "zoplan-rank"  # a rank's process name (``ps``, ``top``): zoplan-rank0, zoplan-rank1, ...
SUPERVISOR_NAME = "zoplan-ranks"  # the process that forked one machine's ranks (runtime/ranks.py)


def name_process(name: str) -> None:
    """This process's name as ``ps`` and ``top`` show it (15 characters at most). Linux only."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def rank_processes(text: str) -> dict[int, int]:
    """The live ranks (rank -> pid) of the run whose command lines mention ``text`` (its directory)."""
    return {
        int(name[len(RANK_NAME) :]): pid
        for pid in processes_naming(text)
        if (name := process_name(pid)).startswith(RANK_NAME) and name[len(RANK_NAME) :].isdigit()
    }


def supervisor_process(text: str) -> int | None:
    """The process that started the ranks of the run whose command lines mention ``text``: the
    rank supervisor on one machine, torchrun on several."""
    for pid in processes_naming(text):
        if process_name(pid) == SUPERVISOR_NAME:
            return pid
        try:
            if b"torch.distributed.run" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None
