"""Files we write: single outputs, and directories we write whole.

Output files: checked before any work starts, written to temporaries, renamed into place at the end.

Policy, the same in every subcommand: an existing output is never replaced without --force, and a
directory is never replaced by a file. Everything we create gets the user's umask (mkstemp/mkdtemp
alone would leave 0600/0700).

Directories we write whole (an export, a checkpoint from make-tiny): built in a temp dir beside OUT,
then swapped in with renames. An existing OUT is replaced only when it is empty, or clearly ours and
--force is given; it may not be, hold or sit in a directory we read from, nor hold the working directory.

Temp dirs are named `.NAME.tmp-PID-HOST-XXXX`; a later run removes those whose writer on this host is
dead (a killed export), never one of a live process or another machine.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .errors import JanusFlowError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask_file(path: str | Path) -> None:
    os.chmod(path, 0o666 & ~current_umask())


def apply_umask_dir(path: str | Path) -> None:
    os.chmod(path, 0o777 & ~current_umask())


def check_output_file(path: str | Path, flag: str, force: bool, suffixes: Sequence[str] = ()) -> Path:
    """Refuse an output we could not or must not write, before the work: -> the path."""
    path = Path(path)
    if path.is_dir():
        raise JanusFlowError(f"{flag} {path} is a directory")
    if suffixes and path.suffix.lower() not in suffixes:
        raise JanusFlowError(f"{flag} {path}: unknown suffix {path.suffix or '(none)'!r}; use one of "
                             f"{', '.join(suffixes)}")
    if path.exists() or path.is_symlink():
        if not force:
            raise JanusFlowError(f"{flag} {path} exists (use --force to replace it)")
        if not path.is_file():
            raise JanusFlowError(f"{flag} {path} exists and is not a regular file")
    parent = path.parent
    if not parent.is_dir():
        raise JanusFlowError(f"{flag} {path}: output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise JanusFlowError(f"{flag} {path}: directory {parent} is not writable")
    return path


def _temp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    apply_umask_file(tmp)
    return tmp


def write_all(items: Sequence[tuple[str | Path, Callable[[str], None]]]) -> list[Path]:
    """Each write(tmp) goes to a temp file beside its path; only when all succeeded are they renamed
    into place, so a failure leaves no output and no temp file behind."""
    temps: list[str] = []
    try:
        for path, write in items:
            temps.append(_temp_beside(Path(path)))
            write(temps[-1])
        for (path, _), tmp in zip(items, temps, strict=True):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        raise
    return [Path(p) for p, _ in items]


def write_atomic(path: str | Path, write: Callable[[str], None]) -> Path:
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


def write_into(out: str | Path, items: Sequence[tuple[str, Callable[[str], None]]]) -> list[Path]:
    """write_all of OUT/name for each (name, write), creating OUT (and parents) first; the directories
    created here are removed again if a write fails."""
    out = Path(out)
    created = [d for d in [out, *out.parents] if not d.exists()]
    out.mkdir(parents=True, exist_ok=True)
    for d in created:
        apply_umask_dir(d)
    try:
        return write_all([(out / name, write) for name, write in items])
    except BaseException:
        for d in created:  # innermost first; each is empty again (write_all removed its temporaries)
            d.rmdir()
        raise

def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def _inside(a: Path, b: Path) -> bool:
    """a == b or a lies under b (both resolved)."""
    return a == b or b in a.parents


def check_out_dir(out: str | Path, flag: str, force: bool, is_ours: Callable[[Path], bool], what: str,
                  protected: Iterable[tuple[str, str | Path]] = ()) -> Path:
    """Refuse an OUT we must not replace; -> OUT resolved. protected: (label, dir) pairs we read from."""
    out = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if _inside(cwd, out):
        raise JanusFlowError(f"{flag} {out} is or contains the current directory; name a new directory")
    for label, p in protected:
        p = Path(p).expanduser().resolve()
        if _inside(out, p) or _inside(p, out):
            raise JanusFlowError(f"{flag} {out} is, contains or lies inside the {label} directory {p}")
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
    parent = out.parent
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise JanusFlowError(f"cannot write {flag} {out}: {parent} is not writable")
    return out


def make_tmp(out: Path, flag: str) -> Path:
    """A fresh temp dir beside out (created with the user's umask); stale ones of ours are removed first."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-{_host()}-", dir=out.parent))
    except OSError as e:
        raise JanusFlowError(f"cannot write {flag} {out}: {e.strerror or e}") from None
    apply_umask_dir(tmp)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-HOST-*` / `.NAME.old-PID-HOST` beside out whose writer here is dead."""
    pat = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)-{re.escape(_host())}(?:-.*)?$")
    removed = []
    for p in out.parent.iterdir() if out.parent.is_dir() else ():
        m = pat.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def replace_dir(tmp: Path, out: Path) -> None:
    """Swap tmp in for out with renames only: a crash leaves either the old or the new OUT.
    Everything in tmp is ours and new: it gets the user's umask (some writers use 0600 temp files)."""
    for root, dirs, files in os.walk(tmp):
        for d in dirs:
            apply_umask_dir(Path(root) / d)
        for f in files:
            apply_umask_file(Path(root) / f)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{_host()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
