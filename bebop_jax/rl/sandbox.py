"""A sandbox for untrusted Python: `run_python(source, limits) -> SandboxResult`, which never raises.

The program runs in a fresh `python -I -S -B` (isolated: no environment variables, user site, site
packages or bytecode writes) started from this same file, in its own session, in a throw-away
directory that is also its HOME and TMPDIR, with an empty environment, stdin from /dev/null and
stdout/stderr sent to files. Before the program runs, the child sets its own resource limits (CPU
seconds, address space, file size, open files, no core dumps; done in the child rather than in a
`preexec_fn`, which is unsafe in the multi-threaded trainer) and installs an audit hook (PEP 578) that
ends the process with a reason at the first
  - process creation or control: fork, exec, spawn, system, subprocess, kill, setrlimit, and imports
    of `_posixsubprocess` (multiprocessing's spawn path has no audit event) and `_ctypes`;
  - network use: any `socket.*` event (creation, DNS, connect, bind, send);
  - write outside the directory: opening for writing or creating, removing, renaming, linking,
    chmod/chown/utime/truncate/xattr/mkfifo/mknod or a sqlite3 database outside it (fds and
    dir_fd-relative paths resolved through /proc), or an `os.open` handle on a directory outside it,
    which could serve as a dir_fd.
The parent kills the whole process group at the wall limit and after every run, so nothing outlives
it. As root the kernel ignores RLIMIT_NPROC (and for other users it counts every task of the user,
the trainer's threads included), so it is not used: the hook's "no new processes" is the process limit
and the group kill the backstop; threads stay allowed, bounded by the address-space limit.
The program succeeds only if it runs to its last line: `sys.exit()` or `os._exit()` before the end
is "early_exit", so a solution cannot skip the tests appended after it. The source file is deleted
before the program starts, so it cannot read the tests either.

The file holds both sides: first the child (stdlib modules that load in ~10 ms, since a sandbox
starts per completion), which ends in `os._exit` when run as a script, then the parent API.
Left out on purpose: kernel isolation (namespaces, seccomp, a separate uid): the audit hook stops
programs that do these things naively or by accident, not a program written to defeat Python-level
hooks (PEP 578 says as much); a disk quota (each file is capped, not the number of files).
"""

from __future__ import annotations

import builtins
import os
import resource
import sys
import types

# ---- child side: runs in the sandboxed interpreter -----------------------------------------------------

_PROCESS_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "os.system", "subprocess.Popen",
    "os.kill", "os.killpg", "resource.setrlimit", "resource.prlimit"})
_PROCESS_MODULES = frozenset({"_posixsubprocess", "_ctypes"})
# event -> ((index of a path argument, index of its dir_fd argument or None), ...)
_WRITE_EVENTS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.symlink": ((1, 2),), "os.truncate": ((0, None),),
    "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
    "os.mkfifo": ((0, 1),), "os.mknod": ((0, 1),),  # raised by the wrappers of _audit_unaudited
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _resolve(path, dir_fd) -> str:
    """The real path a call would touch: fds and dir_fd-relative paths are resolved through /proc."""
    if isinstance(path, int):
        path = f"/proc/self/fd/{path}"
    path = os.fsdecode(path)
    if dir_fd not in (None, -1) and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.realpath(path)


def _inside(real: str, work: str) -> bool:
    return real == work or real.startswith(work + os.sep) or real == os.devnull


def _violation(event: str, args: tuple, work: str) -> str | None:
    """The forbidden_* reason of an audit event, or None when it is allowed."""
    if event.startswith("socket."):
        return "forbidden_network"
    if event in _PROCESS_EVENTS or (event == "import" and args[0] in _PROCESS_MODULES):
        return "forbidden_process"
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):  # an fd already open; writing to it needs no new permission
            return None
        real = _resolve(path, None)
        # os.open (mode None) of a directory: a dir_fd for later calls, which the "open" event does not show
        handle = flags & _WRITE_FLAGS or (mode is None and os.path.isdir(real))
        return "forbidden_write" if handle and not _inside(real, work) else None
    if event == "sqlite3.connect":  # a database file; URIs ('file:/x.db?mode=rwc') lose scheme and query
        database = os.fsdecode(args[0])
        database = database[5:].split("?")[0] if database.startswith("file:") else database
        return None if _inside(_resolve(database, None), work) else "forbidden_write"
    for path_index, fd_index in _WRITE_EVENTS.get(event, ()):
        dir_fd = None if fd_index is None else args[fd_index]
        if not _inside(_resolve(args[path_index], dir_fd), work):
            return "forbidden_write"
    return None


def _audit_unaudited() -> None:
    """os.mkfifo and os.mknod create files without an audit event: wrap them to raise one."""
    def audited(name, function):
        def call(path, *args, dir_fd=None, **kwargs):
            sys.audit(f"os.{name}", path, dir_fd)
            return function(path, *args, dir_fd=dir_fd, **kwargs)
        return call

    for name in ("mkfifo", "mknod"):
        setattr(os, name, audited(name, getattr(os, name)))


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # output limit reached, or a closed/replaced stream
            pass


def _report(status, verdict: str, detail: str = "") -> None:
    """Writes the verdict to the status file (any detail to stderr) and ends the process at once."""
    _flush_stdio()
    if detail:
        os.write(2, f"\nsandbox: {verdict}: {detail}\n".encode("utf-8", "replace"))
    status.write(verdict + "\n")
    status.flush()
    os._exit(0 if verdict == "done" else 1)


def _print_exception(e: BaseException) -> None:
    """The usual traceback on stderr without the sandbox's frame (printed by C code: no imports)."""
    e = e.with_traceback(e.__traceback__.tb_next)
    sys.__excepthook__(type(e), e, e.__traceback__)


def _child_main(work: str, status_path: str, main_path: str, cpu_s: str, memory_bytes: str,
                output_bytes: str, open_files: str) -> None:
    """Limits, audit hook, then the program as `__main__`; reports one verdict and exits."""
    for limit, value in ((resource.RLIMIT_CPU, (int(cpu_s), int(cpu_s) + 1)),
                         (resource.RLIMIT_AS, (int(memory_bytes),) * 2),
                         (resource.RLIMIT_FSIZE, (int(output_bytes),) * 2),
                         (resource.RLIMIT_NOFILE, (int(open_files),) * 2), (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(limit, value)
    work = os.path.realpath(work)
    status = open(status_path, "w")
    with open(main_path, encoding="utf-8", errors="surrogatepass") as f:
        source = f.read()
    os.remove(main_path)
    try:
        code = compile(source, "main.py", "exec")
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes, on older 3.11 releases
        _print_exception(e)
        _report(status, "syntax_error")

    def hook(event, args):
        verdict = _violation(event, args, work)
        if verdict is not None:
            _report(status, verdict, f"{event}{args[:2]!r}"[:300])

    _audit_unaudited()
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.addaudithook(hook)
    try:
        exec(code, main.__dict__)
    except MemoryError:
        _report(status, "memory")
    except SystemExit:
        _report(status, "early_exit")
    except BaseException as e:  # noqa: BLE001 - any uncaught exception is the program's failure
        _print_exception(e)
        _report(status, "error")
    _report(status, "done")


if __name__ == "__main__":
    _child_main(*sys.argv[1:])  # never returns: the parent side below is not loaded in the child

# ---- parent side -------------------------------------------------------------------------------------

import dataclasses  # noqa: E402 - after the child's exit, so that the child starts fast
import logging  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402 - also keeps _posixsubprocess out of the child
import tempfile  # noqa: E402
import time  # noqa: E402

log = logging.getLogger(__name__)

REASONS = {
    "ok": "ran to its last line",
    "error": "an uncaught exception (a failed assert included)",
    "syntax_error": "the source does not compile",
    "early_exit": "exited before its last line (sys.exit, os._exit)",
    "timeout": "over the wall-clock or CPU-time limit",
    "memory": "MemoryError at the address-space limit",
    "output_limit": "stdout or stderr reached the output limit",
    "crash": "killed by a signal (segfault, abort)",
    "forbidden_process": "tried to create or signal a process, change limits or load native code",
    "forbidden_network": "tried to use a socket",
    "forbidden_write": "tried to write outside its directory",
    "sandbox_error": "the sandbox itself failed (logged with its traceback)",
}
_CHILD_VERDICTS = ("syntax_error", "memory", "forbidden_process", "forbidden_network", "forbidden_write")


@dataclasses.dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 512          # address space (RLIMIT_AS)
    output_bytes: int = 1 << 16   # stdout, stderr and any file written (RLIMIT_FSIZE)
    open_files: int = 64

    def __post_init__(self):
        for name in ("wall_s", "cpu_s", "memory_mb", "output_bytes", "open_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    ok: bool
    reason: str       # a key of REASONS
    stdout: str       # each at most Limits.output_bytes
    stderr: str
    wall_s: float


def run_python(source: str, limits: Limits = Limits()) -> SandboxResult:
    """Runs `source` sandboxed; every failure, the sandbox's own included, is a result with a reason."""
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="bebop_sandbox_", ignore_cleanup_errors=True) as root:
            reason, stdout, stderr = _run_in(root, source, limits)
    except Exception as e:  # noqa: BLE001 - the training loop must go on; the traceback is logged
        log.exception("sandbox failed to run a program")
        reason, stdout, stderr = "sandbox_error", "", f"{type(e).__name__}: {e}"
    result = SandboxResult(reason == "ok", reason, stdout, stderr, time.monotonic() - start)
    if not result.ok:
        log.info("sandbox: %s (%s) after %.2f s; stderr ends %r", reason, REASONS[reason], result.wall_s,
                 stderr[-300:])
    return result


def _run_in(root: str, source: str, limits: Limits) -> tuple[str, str, str]:
    """Runs the child in `root`/work; returns (reason, stdout, stderr)."""
    work, status, main = (os.path.join(root, name) for name in ("work", "status", "main.py"))
    os.mkdir(work)
    with open(main, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(source)
    args = [work, status, main, limits.cpu_s, limits.memory_mb << 20, limits.output_bytes, limits.open_files]
    with open(os.path.join(root, "stdout"), "wb+") as out, open(os.path.join(root, "stderr"), "wb+") as err:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), *map(str, args)],
                                cwd=work, env={"HOME": work, "TMPDIR": work}, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=limits.wall_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)
            proc.wait()
        stdout, stderr = _read_capped(out, limits.output_bytes), _read_capped(err, limits.output_bytes)
    reason = _classify(timed_out, proc.returncode, _verdict(status),
                       max(len(stdout), len(stderr)) >= limits.output_bytes)
    return reason, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the group is already empty
        pass


def _read_capped(file, limit: int) -> bytes:
    file.seek(0)
    return file.read(limit)


def _verdict(path: str) -> str:
    """The last word the child wrote to its status file ("done" or a reason), or "" if none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            words = f.read().split()
    except FileNotFoundError:
        return ""
    return words[-1] if words else ""


def _classify(timed_out: bool, returncode: int, verdict: str, output_full: bool) -> str:
    """The reason of a finished run, the most specific first."""
    if timed_out:
        return "timeout"
    if verdict in _CHILD_VERDICTS:
        return verdict
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):  # soft, then hard RLIMIT_CPU
        return "timeout"
    if output_full:
        return "output_limit"
    if returncode < 0:
        return "crash"
    if verdict == "done" and returncode == 0:
        return "ok"
    return "error" if verdict == "error" else "early_exit"
