"""A rank server: one process that has imported what a rank needs and forks a run's rank
supervisor on request, so that many short runs pay those imports once.

A ``zoplan run`` or ``zoplan calibrate`` on one machine starts a rank supervisor
(runtime/ranks.py), which imports torch, transformers and the worker before it forks the ranks:
seconds of every short run (docs/results/suite.md). Where runs follow each other (a test suite, a
sweep, a notebook), start a server once::

    python -m zoplan.runtime.ranks --serve /tmp/zoplan.sock [--preload opt,llama]
    export ZOPLAN_RANK_SERVER=/tmp/zoplan.sock

and each launcher whose environment names it sends the server the supervisor's arguments, its
environment, its working directory and its log's file descriptor (over the Unix socket); the
server forks, the child becomes that run's supervisor exactly as a fresh ``python -m
zoplan.runtime.ranks`` would (the same arguments, environment and output), and the server reports
its pid and, later, its exit status. What a run does is unchanged; only who starts its supervisor.

Lifetimes: the server never computes (as the supervisor, it only forks). A launcher that goes away
(SIGKILL included) closes its connection: the server sends that run's supervisor SIGTERM, which
stops its ranks. A server that goes away stops its supervisors (each asks the kernel for SIGTERM
when its parent dies). The server stops on SIGTERM or SIGINT, removes its socket and stops the
runs it started. A launcher that cannot reach the server (not started, gone) says so and starts the
supervisor itself. Linux only (file descriptors passed over a Unix socket; PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

SERVER_ENV = "ZOPLAN_RANK_SERVER"  # the launcher's environment names the server's socket here
SERVER_NAME = "zoplan-server"  # the server's process name (``ps``, ``top``)
REQUEST_LIMIT = 1 << 22  # bytes: a request is a few kB of JSON (the environment)
# Variables that libraries may read once, when imported or loaded (Triton's interpreter switch,
# torch's and OpenMP's settings, the hub's offline switch, glibc's allocator, Python's own): a
# forked supervisor would inherit the server's reading of them, so a run whose values differ from
# the server's is refused, and its launcher starts its own supervisor.
IMPORT_TIME_PREFIXES = (
    "TRITON_",
    "TORCH",
    "PYTORCH_",
    "HF_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "OMP_",
    "KMP_",
    "GOMP_",
    "MKL_",
    "OPENBLAS_",
    "MALLOC_",
    "PYTHON",
    "LD_",
    "ZOPLAN_",
)
# not compared: read by the launcher or the ranks while they run (zoplan's own switches: no
# zoplan module reads one when imported), or written by torch itself as it runs (its compile
# cache's folder, once a launcher's own torch has looked it up)
NOT_COMPARED = {
    SERVER_ENV,
    "ZOPLAN_FAULTS",
    "ZOPLAN_HOST_COPY",
    "ZOPLAN_SHARED_MEMORY",
    "ZOPLAN_Z_KERNEL",
    "ZOPLAN_PERTURB_TRITON",
    "ZOPLAN_CC",
    "ZOPLAN_CUDA_GRAPHS",
    "ZOPLAN_MEETINGS",
    "ZOPLAN_PLAN_WORKERS",
    "ZOPLAN_NODES_MET",
    "ZOPLAN_NODES_NOTE_AFTER_S",
    "ZOPLAN_STALL_NOTE_AFTER_S",
    "TORCHINDUCTOR_CACHE_DIR",
    "TORCH_WARM_POOL",
    "KMP_DUPLICATE_LIB_OK",
}


def import_time_differences(server: Mapping[str, str], run: Mapping[str, str]) -> list[str]:
    """The variables read at import whose values differ between the server's and a run's
    environment (set in one, unset in the other included)."""
    from zoplan.runtime.launch import SHARE_THREADS_ENV

    names = {n for n in (*server, *run) if n.startswith(IMPORT_TIME_PREFIXES) and n not in NOT_COMPARED}
    # zoplan's mark of a thread count it chose: the user's side of it is OMP_NUM_THREADS, set or not
    return sorted({"OMP_NUM_THREADS" if n == SHARE_THREADS_ENV else n for n in names if server.get(n) != run.get(n)})


def _send_line(sock: socket.socket, payload: dict) -> None:
    sock.sendall(json.dumps(payload).encode() + b"\n")


def _read_line(sock: socket.socket, first: bytes = b"") -> dict | None:
    """One JSON line from ``sock`` (``first``: what has already been read); None at end of file."""
    data = first
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
        if len(data) > REQUEST_LIMIT:
            raise ValueError("request too long")
    return json.loads(data)


# ---------------------------------------------------------------- the launcher's side


class ServedProcess:
    """The rank supervisor that a rank server forked for this launcher: what the launchers use of
    ``subprocess.Popen`` (pid, returncode, poll, wait, terminate, kill)."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock, self.pid = sock, pid
        self.returncode: int | None = None
        self.server_gone = False  # the server went away before the supervisor's exit (it stops them)

    def _collect(self, timeout: float | None) -> None:
        if self.returncode is not None:
            return
        self.sock.settimeout(timeout)
        try:
            reply = _read_line(self.sock)
        except (TimeoutError, BlockingIOError):
            return
        except (OSError, ValueError):
            reply = None
        # a server gone mid-run: its supervisor has been told to stop (PR_SET_PDEATHSIG) and its
        # exit is unknown here; the run is reported as failed, by the server's going
        self.server_gone = not (reply and "exit" in reply)
        self.returncode = 1 if self.server_gone else int(reply["exit"])
        self.sock.close()

    def poll(self) -> int | None:
        self._collect(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._collect(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"rank supervisor {self.pid}", timeout or 0.0)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def request(path: str, argv: Sequence[str], log_fd: int, env: Mapping[str, str]) -> ServedProcess:
    """Have the server at ``path`` fork a rank supervisor with ``argv`` (runtime/ranks.py's), its
    output to ``log_fd``, in ``env`` and this working directory. OSError when the server cannot be
    reached or refuses."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(30.0)
        sock.connect(path)
        payload = json.dumps({"argv": list(argv), "env": dict(env), "cwd": os.getcwd()}).encode() + b"\n"
        socket.send_fds(sock, [payload], [log_fd])
        reply = _read_line(sock)
        if not reply or "pid" not in reply:
            raise OSError(f"the rank server at {path} refused the run: {(reply or {}).get('error', 'no reply')}")
        return ServedProcess(sock, int(reply["pid"]))
    except (OSError, ValueError) as exc:
        sock.close()
        raise OSError(str(exc)) from exc


def start(
    path: Path, preload: Sequence[str] = (), env: Mapping[str, str] | None = None, log=None, timeout: float = 120.0
) -> subprocess.Popen:
    """Start a rank server on ``path`` (in ``env``, default this process's) and wait until it
    serves. Its output goes to ``log`` (a file, or ``subprocess.PIPE``: text), else is discarded. The caller stops it
    (``terminate()``); it also stops when the caller's process ends."""
    import time

    cmd = [sys.executable, "-m", "zoplan.runtime.ranks", "--serve", str(path)]
    if preload:
        cmd += ["--preload", ",".join(preload)]
    server = subprocess.Popen(
        cmd,
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        text=log == subprocess.PIPE,
        env=dict(os.environ if env is None else env),
    )
    deadline = time.monotonic() + timeout
    while not path.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            server.wait()
            raise OSError(f"the rank server on {path} did not start (exit status {server.returncode})")
        time.sleep(0.05)
    return server


# ---------------------------------------------------------------- the server's side


def _child(sel: selectors.BaseSelector, sockets: list[socket.socket], req: dict, log_fd: int) -> None:
    """The forked child: become the run's rank supervisor (never returns)."""
    code = 1
    try:
        from zoplan.runtime.signals import after_fork

        # forked with the stopping signals held (the server's handler only notes them): the
        # supervisor's own, from here (a SIGTERM sent meanwhile now stops it)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        after_fork()
        sel.close()
        for sock in sockets:  # the server's: neither this supervisor nor its ranks keep them
            sock.close()
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        tempfile.tempdir = None  # TMPDIR is this run's
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null)
        os.close(log_fd)
        from zoplan.runtime import ranks

        sys.argv = [ranks.__file__, *req["argv"]]
        ranks.main(list(req["argv"]))  # exits the process itself
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001  (said in the run's log)
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _preload(model_types: Sequence[str]) -> None:
    import importlib

    from zoplan.runtime import calibrate, worker  # noqa: F401  (what every rank imports)

    importlib.import_module("transformers").AutoModelForCausalLM  # noqa: B018  (the auto classes)
    for model_type in model_types:
        try:
            importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except ImportError:
            print(f"[zoplan server] no modelling code for '{model_type}' in transformers", file=sys.stderr)


def serve(path: Path, model_types: Sequence[str] = ()) -> int:
    """Serve requests on the Unix socket ``path`` until SIGTERM or SIGINT."""
    from zoplan.runtime.signals import STOPPING, die_with_parent, signals_held
    from zoplan.runtime.scratch import name_process

    die_with_parent(signal.SIGTERM)  # a server whose parent (a test session, a shell) is gone stops
    name_process(SERVER_NAME)
    own_env = dict(os.environ)  # as the preloaded modules read it
    _preload(model_types)
    stopping: list[int] = []

    def stop(signum, frame):
        stopping.append(signum)

    for signum in STOPPING:
        signal.signal(signum, stop)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    served: dict[socket.socket, int] = {}  # connection -> its supervisor's pid
    started = refused = 0
    print(f"[zoplan server] serving on {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
    try:
        while not stopping:
            for key, _ in sel.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is listener:
                    conn, _ = listener.accept()
                    fds: list[int] = []
                    try:
                        conn.settimeout(10.0)
                        data, fds, _, _ = socket.recv_fds(conn, 65536, 1)
                        req = _read_line(conn, data) if data else None
                        if req is None or len(fds) != 1:
                            raise ValueError("a request is one JSON line and one file descriptor")
                        differ = import_time_differences(own_env, req["env"])
                        if differ:
                            raise ValueError(
                                f"the run's environment differs from the server's in {', '.join(differ)}, "
                                "read when torch, transformers or the kernels are imported"
                            )
                    except (OSError, ValueError, TypeError, KeyError) as exc:
                        for fd in fds:
                            os.close(fd)
                        refused += 1
                        print(f"[zoplan server] refused a run: {exc}", file=sys.stderr, flush=True)
                        try:
                            _send_line(conn, {"error": str(exc)})
                        except OSError:
                            pass
                        conn.close()
                        continue
                    with signals_held():
                        pid = os.fork()
                        if pid == 0:
                            _child(sel, [listener, conn, *served], req, fds[0])
                    os.close(fds[0])
                    started += 1
                    try:
                        _send_line(conn, {"pid": pid})
                    except OSError:  # the launcher is already gone: so is its run
                        os.kill(pid, signal.SIGTERM)
                    conn.setblocking(False)
                    served[conn] = pid
                    sel.register(conn, selectors.EVENT_READ)
                else:  # a launcher's end of file (it has nothing else to say): it is gone
                    try:
                        gone = not sock.recv(1)
                    except OSError:
                        gone = True
                    if gone:
                        sel.unregister(sock)
                        if sock in served:
                            try:
                                os.kill(served[sock], signal.SIGTERM)
                            except ProcessLookupError:
                                pass
            _reap(served, sel)
    finally:
        for pid in served.values():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in list(served.values()):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        listener.close()
        path.unlink(missing_ok=True)
        print(
            f"[zoplan server] stopped after starting {started} run(s) and refusing {refused} request(s)",
            file=sys.stderr,
            flush=True,
        )
    return 0


def _reap(served: dict[socket.socket, int], sel: selectors.BaseSelector) -> None:
    """Tell each launcher whose supervisor has exited its exit status."""
    while served:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        for conn, child in list(served.items()):
            if child == pid:
                del served[conn]
                try:
                    conn.setblocking(True)
                    _send_line(conn, {"exit": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass
                try:
                    sel.unregister(conn)
                except (KeyError, ValueError):  # already, when its launcher went first
                    pass
                conn.close()


def serve_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m zoplan.runtime.ranks --serve", description=__doc__.splitlines()[0])
    parser.add_argument("socket", type=Path, help="the Unix socket to serve on (ZOPLAN_RANK_SERVER names it)")
    parser.add_argument(
        "--preload", default="", help="model types whose modelling code to import first, comma-separated (opt,llama)"
    )
    args = parser.parse_args(argv)
    from zoplan.runtime.launch import rank_env

    env = rank_env(os.environ)
    if env != dict(os.environ):  # in the environment the launchers give their ranks (read at start)
        os.execve(sys.executable, [sys.executable, "-m", "zoplan.runtime.ranks", "--serve", *argv], env)
    code = serve(args.socket, [t for t in args.preload.split(",") if t])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
