"""Output files: checked before any work starts, written to temporaries, renamed into place at the end.

Policy, the same in every subcommand: an existing output is never replaced without --force, and a
directory is never replaced by a file. Everything we create gets the user's umask (mkstemp/mkdtemp
alone would leave 0600/0700).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
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
