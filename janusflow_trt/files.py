"""Files we write: one output-transaction mechanism for every command that writes.

Policy, the same in every subcommand: outputs are checked before any work; an existing output is never
replaced without --force; a directory is never replaced by a file; everything we create gets the
user's umask (mkstemp/mkdtemp alone would leave 0600/0700).

The promise, for a process killed at any point (SIGKILL included): the user's path holds either the
complete old output or the complete new one, and the next run that writes there finishes the job
(recover_dir / recover_files) without ever deleting the only copy of anything.

- A directory (export, make-tiny, build): `dir_transaction(out)` yields a fresh `.NAME.tmp-ID` beside
  OUT; when the work is done it is renamed `.NAME.new-ID` (the commit point: a `new` is complete), then
  swapped with OUT in one atomic renameat2(RENAME_EXCHANGE) (Linux), so OUT is never missing. Where the
  exchange is unsupported: OUT -> `.NAME.old-ID`, `new` -> OUT; a kill between the two renames leaves
  no OUT, and recovery renames the complete `new` (else the `old`) back into place.
- A set of files (generate's images + latents, quality's and bench's reports): each file is written to
  `.NAME.tmp-ID` beside it; with several files, a journal `.janusflow.txn-ID` listing the renames is
  written (the commit point) before the first of them. A kill during the renames leaves every file
  whole (old or new); recovery rolls a committed set forward, so the set ends all new, and removes the
  temporaries of an uncommitted one (the old set stays).
- Work directories under the system temp dir (`owned_tempdir`): removed on every exit path, and by a
  later run once their writer is dead.

ID = HOST-PID-START: START is the writer's process start time (psutil, centiseconds). A later run
removes or recovers a temporary only when its writer is provably dead: same host, and no process with
that pid, or one that started at another time (the pid was reused). Another host's or a live
process's temporaries are never touched.

Fault injection (tests only): JANUSFLOW_FAULT_AT=N kills this process with SIGKILL at the N-th
filesystem boundary of a transaction; JANUSFLOW_FAULT_LOG=FILE appends each boundary's label to FILE;
JANUSFLOW_NO_EXCHANGE=1 takes the two-rename path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import psutil

from .errors import JanusFlowError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask_file(path: str | Path) -> None:
    os.chmod(path, 0o666 & ~current_umask())


def apply_umask_dir(path: str | Path) -> None:
    os.chmod(path, 0o777 & ~current_umask())


# -- writer identity -------------------------------------------------------------------------------
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def _start_of(pid: int) -> int:
    return round(psutil.Process(pid).create_time() * 100)


HOST = _host()
_ME = f"{HOST}-{os.getpid()}-{_start_of(os.getpid())}"


def writer_id() -> str:
    """HOST-PID-START of this process (recomputed after a fork)."""
    global _ME
    if not _ME.startswith(f"{HOST}-{os.getpid()}-"):
        _ME = f"{HOST}-{os.getpid()}-{_start_of(os.getpid())}"
    return _ME


_ID = r"(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-(?P<start>\d+)"
# .NAME.KIND-HOST-PID-START-RAND[.suffix]; NAME may hold dots
_TAG = re.compile(rf"^\.(?P<name>.+)\.(?P<kind>tmp|new|old|txn)-{_ID}-(?P<rand>[0-9a-f]+)(?:\.[A-Za-z0-9]+)?$")
# the names before process start times were recorded: .NAME.tmp-PID-HOST-XXXX, .NAME.old-PID-HOST
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[A-Za-z0-9_]+)(?:-(?P<rand>.*))?$")


def writer_dead(host: str, pid: int, start: int | None) -> bool:
    """True only when the writer is provably gone: this host, and no such process, a zombie, or another
    process under a reused pid (start differs). start None (legacy names): the pid alone decides."""
    if host != HOST:
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return True
        return start is not None and abs(_start_of(pid) - start) > 1
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # exists but unreadable (another user's): alive
        return False


def _parse(p: Path) -> tuple[str, str, str] | None:
    """-> (name, kind, writer key) of a temporary of a dead writer, else None."""
    m = _TAG.match(p.name)
    if m:
        if not writer_dead(m["host"], int(m["pid"]), int(m["start"])):
            return None
        return m["name"], m["kind"], f"{m['host']}-{m['pid']}-{m['start']}-{m['rand']}"
    m = _LEGACY.match(p.name)
    if m and writer_dead(m["host"], int(m["pid"]), None):
        return m["name"], m["kind"], f"{m['host']}-{m['pid']}-legacy"
    return None


def _temp_name(path: Path, kind: str, rand: str, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{kind}-{writer_id()}-{rand}{suffix}")


# -- fault injection (tests) -------------------------------------------------------------------------
_boundaries = 0


def boundary(label: str) -> None:
    """A point between two filesystem steps of a transaction (see the module docstring)."""
    global _boundaries
    _boundaries += 1
    log = os.environ.get("JANUSFLOW_FAULT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{_boundaries} {label}\n")
    if os.environ.get("JANUSFLOW_FAULT_AT") == str(_boundaries):
        os.kill(os.getpid(), signal.SIGKILL)


# -- errors while writing ------------------------------------------------------------------------------
def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind exc (itself, its cause or context), or one a library folded into its message
    ('... (os error 28)', safetensors)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        m = re.search(r"os error (\d+)", str(e))
        if m:
            return OSError(int(m[1]), os.strerror(int(m[1])))
        e = e.__cause__ or e.__context__
    return None


def write_error(exc: BaseException, what: str) -> JanusFlowError | None:
    """A one-line JanusFlowError for an OSError while writing `what` (naming the file and the cause)."""
    if not isinstance(exc, Exception) or isinstance(exc, JanusFlowError):  # Ctrl-C / SIGTERM stay what they are
        return None
    e = os_error_in(exc)
    if e is None:
        return None
    where = f" ({e.filename})" if e.filename else ""
    return JanusFlowError(f"cannot write {what}{where}: {e.strerror or errno.errorcode.get(e.errno or 0, e)}")


# -- single outputs and sets of files ------------------------------------------------------------------
def check_output_file(path: str | Path, flag: str, force: bool, suffixes: Sequence[str] = ()) -> Path:
    """Refuse an output we could not or must not write, before the work: -> the path. A crashed
    earlier write beside it is finished first (recover_files)."""
    path = Path(path)
    if path.is_dir():
        raise JanusFlowError(f"{flag} {path} is a directory")
    if suffixes and path.suffix.lower() not in suffixes:
        raise JanusFlowError(f"{flag} {path}: unknown suffix {path.suffix or '(none)'!r}; use one of "
                             f"{', '.join(suffixes)}")
    parent = path.parent
    if not parent.is_dir():
        raise JanusFlowError(f"{flag} {path}: output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise JanusFlowError(f"{flag} {path}: directory {parent} is not writable")
    recover_files([parent])
    if path.exists() or path.is_symlink():
        if not force:
            raise JanusFlowError(f"{flag} {path} exists (use --force to replace it)")
        if not path.is_file():
            raise JanusFlowError(f"{flag} {path} exists and is not a regular file")
    return path


def _create_temp(path: Path, rand: str) -> Path:
    tmp = _temp_name(path, "tmp", rand, path.suffix)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~current_umask()))
    return tmp


def _write_json(path: Path, obj) -> None:
    """A small file in one atomic step (temp + rename)."""
    tmp = path.with_name(path.name.replace(".txn-", ".tmp-", 1))
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def write_all(items: Sequence[tuple[str | Path, Callable[[str], object]]], what: str | None = None) -> list[Path]:
    """Each write(tmp) goes to a temp file beside its path; only when all succeeded are they renamed
    into place, as one unit (a journal commits a set of several). A failure leaves the old files and no
    temporary; an OSError (a full disk) becomes one JanusFlowError line naming the file."""
    paths = [Path(p) for p, _ in items]
    dirs = list(dict.fromkeys(p.parent for p in paths))
    rand = secrets.token_hex(4)
    temps: list[Path] = []
    journals: list[Path] = []
    committed = False
    try:
        for path, (_, write) in zip(paths, items, strict=True):
            temps.append(_create_temp(path, rand))
            boundary(f"created {temps[-1].name}")
            write(str(temps[-1]))
            boundary(f"wrote {temps[-1].name}")
        if len(paths) > 1:
            # one journal copy per directory, the first directory's last: its appearance commits the set
            journals = [d / f".janusflow.txn-{writer_id()}-{rand}" for d in dirs[1:] + dirs[:1]]
            entry = {"renames": [[str(t.absolute()), str(p.absolute())] for t, p in zip(temps, paths, strict=True)],
                     "journals": [str(j.absolute()) for j in journals]}
            for j in journals:
                _write_json(j, entry)
                boundary(f"journal {j.name}")
        committed = True
        for tmp, path in zip(temps, paths, strict=True):
            os.replace(tmp, path)
            boundary(f"renamed {path.name}")
        for j in journals:
            j.unlink()
            boundary(f"removed {j.name}")
    except BaseException as e:
        if committed:  # interrupted between renames (a signal, an error): finish the set
            _roll_forward(list(zip(temps, paths, strict=True)), journals)
        else:
            for p in temps + journals + [j.with_name(j.name.replace(".txn-", ".tmp-", 1)) for j in journals]:
                p.unlink(missing_ok=True)
        err = write_error(e, what or ", ".join(str(p) for p in paths))
        if err is not None:
            raise err from None
        raise
    return paths


def _roll_forward(renames: list[tuple[Path, Path]], journals: list[Path]) -> None:
    for tmp, path in renames:
        if tmp.exists():
            os.replace(tmp, path)
    for j in journals:  # the commit journal (last) goes last
        j.unlink(missing_ok=True)


def recover_files(dirs: Iterable[Path]) -> None:
    """Finish the file sets of dead writers in dirs: a committed set (its commit journal exists) rolls
    forward; the temporaries of an uncommitted one are removed (the old files were never touched)."""
    found: list[tuple[Path, str, str]] = []
    for d in dirs:
        for p in d.iterdir() if d.is_dir() else ():
            parsed = _parse(p) if p.name.startswith(".") and not p.is_dir() else None
            if parsed:
                found.append((p, parsed[1], parsed[2]))
    for p, kind, _ in found:
        if kind == "txn" and p.exists():
            try:
                j = json.loads(p.read_text())
                renames = [(Path(t), Path(d)) for t, d in j["renames"]]
                journals = [Path(x) for x in j["journals"]]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not ours after all: leave it
            if journals[-1].exists():
                _roll_forward(renames, journals)
            else:
                for t, _ in renames:
                    t.unlink(missing_ok=True)
                for x in journals:
                    x.unlink(missing_ok=True)
    for p, kind, _ in found:
        # a temp file of a dead writer whose set is not committed in this directory (a journal copy in
        # every directory of the set appears before the commit and goes after the last rename)
        if kind != "txn" and p.exists():
            p.unlink()


def write_atomic(path: str | Path, write: Callable[[str], object]) -> Path:
    """write(tmp) to a temp file beside `path`, then rename: no half-written file is ever left."""
    return write_all([(path, write)])[0]


def check_output_dir(out: str | Path, flag: str, force: bool, names: Sequence[str]) -> Path:
    """Before the work: OUT is a directory we may create (with its parents) or write `names` into
    (an existing one of them only with --force); -> OUT."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise JanusFlowError(f"{flag} {out} exists and is not a directory")
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise JanusFlowError(f"{flag} {out} is not writable")
        for name in names:
            check_output_file(out / name, flag, force)
        return out
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise JanusFlowError(f"{flag} {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise JanusFlowError(f"{flag} {out}: {parent} is not writable")
    return out


def write_into(out: str | Path, items: Sequence[tuple[str, Callable[[str], object]]]) -> list[Path]:
    """write_all of OUT/name for each (name, write), creating OUT (and parents) first; the directories
    created here are removed again if a write fails."""
    out = Path(out)
    created = [d for d in [out, *out.parents] if not d.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JanusFlowError(f"cannot write {out}: {e.strerror or e}") from None
    for d in created:
        apply_umask_dir(d)
    try:
        return write_all([(out / name, write) for name, write in items], what=str(out))
    except BaseException:
        for d in created:  # innermost first; each is empty again (write_all removed its temporaries)
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


# -- directories we write whole ------------------------------------------------------------------------
def _inside(a: Path, b: Path) -> bool:
    """a == b or a lies under b (both resolved)."""
    return a == b or b in a.parents


def check_out_dir(out: str | Path, flag: str, force: bool, is_ours: Callable[[Path], bool], what: str,
                  protected: Iterable[tuple[str, str | Path]] = ()) -> Path:
    """Refuse an OUT we must not replace; -> OUT resolved. protected: (label, dir) pairs we read from.
    A crashed earlier swap of OUT is finished first (recover_dir), so the check sees the real OUT."""
    out = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if _inside(cwd, out):
        raise JanusFlowError(f"{flag} {out} is or contains the current directory; name a new directory")
    for label, p in protected:
        p = Path(p).expanduser().resolve()
        if _inside(out, p) or _inside(p, out):
            raise JanusFlowError(f"{flag} {out} is, contains or lies inside the {label} directory {p}")
    parent = out.parent
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise JanusFlowError(f"cannot write {flag} {out}: {parent} is not writable")
    try:
        recover_dir(out)
    except OSError as e:
        raise JanusFlowError(f"cannot recover an interrupted write of {flag} {out}: {e.strerror or e}") from None
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise JanusFlowError(f"{flag} {out} exists and is not a directory")
    if out.is_dir():
        try:
            empty = not any(out.iterdir())
        except OSError as e:
            raise JanusFlowError(f"cannot read {flag} {out}: {e.strerror or e}") from None
        if not empty and not is_ours(out):
            raise JanusFlowError(f"{flag} {out} is not empty and is not {what}; refusing to replace it")
        if not empty and not force:
            raise JanusFlowError(f"{flag} {out} exists (use --force to replace it)")
    return out


def recover_dir(out: Path) -> list[Path]:
    """Finish the swaps of OUT by dead writers: with no OUT, a complete `new` is renamed into place
    (committed), else an `old` is put back; then, with OUT in place, their leftovers are removed.
    Without OUT only `tmp` (never complete) goes. -> the paths removed or moved."""
    groups: dict[str, dict[str, Path]] = {}
    for p in out.parent.iterdir() if out.parent.is_dir() else ():
        parsed = _parse(p) if p.name.startswith(f".{out.name}.") and p.is_dir() and not p.is_symlink() else None
        if parsed and parsed[0] == out.name:
            groups.setdefault(parsed[2], {})[parsed[1]] = p
    touched = []
    for parts in groups.values():
        present = out.exists() or out.is_symlink()
        if not present and ("new" in parts or "old" in parts):
            src = parts.pop("new") if "new" in parts else parts.pop("old")
            os.rename(src, out)
            touched.append(src)
            present = True
        for kind, p in parts.items():
            if present or kind == "tmp":
                shutil.rmtree(p, ignore_errors=True)
                touched.append(p)
    return touched


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (renameat2 RENAME_EXCHANGE); False where the platform
    or filesystem cannot (the caller then takes two renames)."""
    fn = getattr(_libc, "renameat2", None)
    if fn is None or os.environ.get("JANUSFLOW_NO_EXCHANGE"):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _commit_dir(tmp: Path, out: Path) -> None:
    for root, dirs, files in os.walk(tmp):  # everything in tmp is ours and new: the user's umask
        for d in dirs:
            apply_umask_dir(Path(root) / d)
        for f in files:
            apply_umask_file(Path(root) / f)
    apply_umask_dir(tmp)
    new = tmp.with_name(tmp.name.replace(".tmp-", ".new-", 1))
    os.rename(tmp, new)  # the commit point: a `new` is complete
    boundary("committed")
    if not out.exists():
        os.rename(new, out)
        boundary("renamed into place")
        return
    if exchange(new, out):  # OUT is the new one now; `new` holds the old copy
        boundary("exchanged")
        shutil.rmtree(new)
        boundary("removed the old copy")
        return
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
    os.rename(out, old)
    boundary("old aside")
    os.rename(new, out)
    boundary("new in place")
    shutil.rmtree(old)
    boundary("removed the old copy")


@contextlib.contextmanager
def dir_transaction(out: Path, flag: str) -> Iterator[Path]:
    """with dir_transaction(OUT, '--out') as tmp: write everything into tmp; on success tmp replaces OUT
    (see the module docstring); on any failure tmp is removed and OUT is as it was. An OSError (a full
    disk) becomes one JanusFlowError line naming OUT and the cause. OUT: as check_out_dir returned it."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(out, "tmp", secrets.token_hex(4))
        tmp.mkdir()
    except OSError as e:
        raise JanusFlowError(f"cannot write {flag} {out}: {e.strerror or e}") from None
    apply_umask_dir(tmp)
    boundary("created tmp")
    try:
        yield tmp
        _commit_dir(tmp, out)
    except BaseException as e:
        left = {k: tmp.with_name(tmp.name.replace(".tmp-", f".{k}-", 1)) for k in ("new", "old")}
        if not out.exists():  # stopped between the two renames: the complete new one, else the old one
            for p in left.values():
                if p.exists():
                    os.rename(p, out)
                    break
        shutil.rmtree(tmp, ignore_errors=True)
        for p in left.values():
            if out.exists():
                shutil.rmtree(p, ignore_errors=True)
        err = write_error(e, f"{flag} {out}")
        if err is not None:
            raise err from None
        raise


# -- work directories under the system temp dir ---------------------------------------------------------
@contextlib.contextmanager
def owned_tempdir(prefix: str) -> Iterator[Path]:
    """A work directory `PREFIX-HOST-PID-START-RAND` under the system temp dir, removed on every exit path
    (an exception, a signal turned into one by the CLI); those of dead writers are removed first."""
    base = Path(tempfile.gettempdir())
    pat = re.compile(rf"^{re.escape(prefix)}-{_ID}-[0-9a-f]+$")
    for p in base.iterdir():
        m = pat.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and writer_dead(m["host"], int(m["pid"]), int(m["start"])):
            shutil.rmtree(p, ignore_errors=True)
    d = base / f"{prefix}-{writer_id()}-{secrets.token_hex(4)}"
    d.mkdir(mode=0o700)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
