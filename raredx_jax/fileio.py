"""Writing a directory as a unit: nothing half-written, nothing stale, nothing clobbered by accident.

Why this module exists (issue 18): the HF export wrote its shards into whatever directory it was given, so
re-exporting into an existing folder left the old `model-0000x-of-0000y.safetensors` and
`model.safetensors.index.json` beside the new `model.safetensors` (our loader then read the stale index, while
transformers read the new file: two programs, two models, silently); and `convert --to=orbax` saved with
orbax's `force=True`, which deletes the destination first, so `--dst` equal to `--src` destroyed the source
model. Every directory the project writes as a unit (HF export, `convert` destination) therefore goes through
the two functions here:

* `check_destination(src, dst, overwrite)`: refuse, before any work, a destination that is the source, lies
  inside it or contains it, is a file, is not writable, or is not empty (unless `overwrite`).
* `atomic_directory(dst, overwrite)`: a context manager yielding a fresh temporary sibling of `dst` (same
  filesystem, so the final rename is atomic); on success its files are fsynced and it is renamed into place
  (an old `dst` is replaced only when `overwrite`), on failure it is removed and `dst` is untouched. A reader
  sees the old directory or the new one, never a mix.

Replacing takes two renames (old `dst` aside to `.<name>.replaced-<host>-<pid>-<random>/<name>`, the new copy
into place). A process killed between them leaves `dst` missing and its last complete copy aside: the next
`check_destination` or `atomic_directory` on that `dst` renames it back (one line on stderr). A `.replaced-`
sibling left by a dead writer beside an existing `dst` (killed before deleting it) is removed.

Errors are `DestinationError` (a ValueError), whose message is one line naming the path: the CLIs print it and
exit 2.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterator

log = logging.getLogger(__name__)

PARTIAL_TAG = ".partial-"  # temporary siblings are named .<dst name>.partial-<host>-<pid>-<random>
OLD_TAG = ".replaced-"  # an old destination is moved into .<dst name>.replaced-<host>-<pid>-<random> then deleted


class DestinationError(ValueError):
    """A destination directory refused or not writable; the message is one line naming the path."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _inside(child: str, parent: str) -> bool:
    """Whether real path `child` is `parent` or lies under it."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _existing_ancestor(path: str) -> str:
    p = path
    while not os.path.exists(p):
        up = os.path.dirname(p)
        if up == p:
            break
        p = up
    return p


def _os_reason(e: OSError) -> str:
    return e.strerror or (errno.errorcode.get(e.errno, "") if e.errno else "") or str(e)


def check_destination(src: str | None, dst: str, overwrite: bool = False, *, what: str = "--dst",
                      overwrite_hint: str = "pass --overwrite to replace it") -> str:
    """Refuse a destination directory that would lose data or cannot be written; return its absolute path.

    Refused (DestinationError, one line): `dst` equal to `src`, inside it (the rename would land in the tree
    being read) or containing it (replacing `dst` would delete the source); `dst` an existing file or below one;
    a non-empty `dst` unless `overwrite`; a parent directory this process cannot create a sibling in (read-only
    filesystem, permissions). `what` names the setting in the message (`--dst`, `export.hf_dir`).
    Symlinks are resolved first, so a link to the source is the source.
    """
    if not dst:
        raise DestinationError(f"{what}: no destination given")
    real_dst = _real(dst)
    _recover_replaced(real_dst)
    if src:
        real_src = _real(src)
        if real_dst == real_src:
            raise DestinationError(f"{what}={dst} is the source directory itself; writing there would destroy the "
                                   "source: choose another destination")
        if _inside(real_dst, real_src):
            raise DestinationError(f"{what}={dst} lies inside the source {src}; choose a destination outside it")
        if _inside(real_src, real_dst):
            raise DestinationError(f"{what}={dst} contains the source {src}; replacing it would delete the source: "
                                   "choose another destination")
    if os.path.lexists(real_dst) and not os.path.isdir(real_dst):
        raise DestinationError(f"{what}={dst} is a file, not a directory; choose a directory path")
    anc = _existing_ancestor(os.path.dirname(real_dst))
    if not os.path.isdir(anc):
        raise DestinationError(f"{what}={dst}: {anc} is a file, not a directory; choose a directory path")
    if os.path.isdir(real_dst):
        entries = sorted(os.listdir(real_dst))
        if entries and not overwrite:
            raise DestinationError(f"{what}={dst} is not empty ({len(entries)} entries, e.g. {entries[0]!r}); "
                                   f"{overwrite_hint}, or choose an empty or new directory")
    _probe_writable(anc, what, dst)
    return real_dst


def _probe_writable(directory: str, what: str, dst: str) -> None:
    """Create and remove a temporary directory in `directory`: the only reliable test (root ignores the mode
    bits, a read-only mount is not visible in them)."""
    try:
        probe = tempfile.mkdtemp(prefix=".raredx-write-probe-", dir=directory)
    except OSError as e:
        raise DestinationError(f"{what}={dst}: cannot write in {directory} ({_os_reason(e)}); choose a writable "
                               "location") from None
    os.rmdir(probe)


def _fsync_tree(root: str) -> None:
    """fsync every file and directory under `root` (bottom-up), so the rename publishes durable data."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not support fsync on directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(dst: str, overwrite: bool = False, *, what: str = "--dst",
                     overwrite_hint: str = "pass --overwrite to replace it",
                     barrier: Callable[[str], None] | None = None, primary: bool = True) -> Iterator[str]:
    """Yield a fresh empty directory to write into; on success it becomes `dst` in one rename.

    The temporary directory is a sibling of `dst` (`.<name>.partial-<random>`; the same filesystem, so the rename
    is atomic). On success every file in it is fsynced, then it is renamed to `dst`; an existing non-empty `dst`
    is replaced only when `overwrite` (it is first renamed aside into `.<name>.replaced-<host>-<pid>-<random>`,
    then deleted: a crash between the two renames leaves the old directory under that name, never a mix of old and
    new files, and the next call on `dst` renames it back, `_recover_replaced`). On any exception the temporary
    directory is removed and `dst` is left as it was (put back if it had been renamed aside).

    Multi-process writers (orbax saves shards from every process) pass `barrier(name)` (e.g.
    `multihost_utils.sync_global_devices`) and `primary`: the temporary name is then derived from `dst` alone so
    that every process writes into the same directory, and only the primary process creates and renames it.
    """
    real_dst = _real(dst)
    parent, name = os.path.dirname(real_dst), os.path.basename(real_dst)
    multi = barrier is not None
    tmp = os.path.join(parent, f".{name}{PARTIAL_TAG}shared") if multi else ""
    if primary:
        _recover_replaced(real_dst)
        if os.path.lexists(real_dst) and not os.path.isdir(real_dst):
            raise DestinationError(f"{what}={dst} is a file, not a directory; choose a directory path")
        if os.path.isdir(real_dst) and os.listdir(real_dst) and not overwrite:
            raise DestinationError(f"{what}={dst} is not empty; {overwrite_hint}, or choose an empty or new "
                                   "directory")
        try:
            os.makedirs(parent, exist_ok=True)
            if multi:
                shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt's leftovers (our own name)
                os.mkdir(tmp)
            else:
                _remove_dead_partials(parent, name)
                tmp = tempfile.mkdtemp(prefix=f".{name}{PARTIAL_TAG}{_HOST}-{os.getpid()}-", dir=parent)
        except OSError as e:
            raise DestinationError(f"{what}={dst}: cannot write in {parent} ({_os_reason(e)}); choose a writable "
                                   "location") from None
    if multi:
        barrier(f"raredx_atomic_dir_open:{name}")
    try:
        yield tmp
        if multi:
            barrier(f"raredx_atomic_dir_written:{name}")
        if primary:
            _fsync_tree(tmp)
            _publish(tmp, real_dst, overwrite)
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if multi:
        barrier(f"raredx_atomic_dir_done:{name}")


_HOST = "".join(c if c.isalnum() else "_" for c in os.uname().nodename)[:32] or "host"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """A temporary sibling of `path` to write; renamed onto `path` when the block ends, removed if it raises.

    Why: a reader (or a rerun after a crash) sees the old file or the whole new one, never half of one."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.partial-")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _writer(entry: str, prefix: str) -> str:
    """The writer of sibling `entry` (`<prefix><host>-<pid>-...`): "dead" (made on this host by a process that
    no longer runs), "alive" (this process, or one that runs: another user's too) or "unknown" (another host, a
    name without host and pid)."""
    own = f"{prefix}{_HOST}-"
    pid = entry[len(own):].split("-", 1)[0] if entry.startswith(own) else ""
    if not pid.isdigit():
        return "unknown"
    if int(pid) == os.getpid():
        return "alive"
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return "dead"
    except OSError:
        pass  # exists (another user's process)
    return "alive"


def _remove_dead_partials(parent: str, name: str) -> None:
    """Remove temporary siblings of `name` left by a killed writer on this host (its pid no longer runs)."""
    prefix = f".{name}{PARTIAL_TAG}"
    for entry in os.listdir(parent):
        if entry.startswith(prefix) and _writer(entry, prefix) == "dead":
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _recover_replaced(dst: str) -> None:
    """Undo a replacement interrupted between its two renames (`_publish`), before `dst` is checked or written.

    `dst` missing and exactly one `.<name>.replaced-*` sibling holding `<name>` whose writer is not a live process
    of this host: that is the last complete copy, renamed back to `dst` (one line on stderr). Several such copies:
    none is guessed, one line says so. `dst` present: the replaced siblings of dead writers on this host are
    removed (their writer was killed before deleting them), like dead partials. Errors are left to the checks
    that follow (a parent that cannot be listed or written is reported there).
    """
    parent, name = os.path.dirname(dst), os.path.basename(dst)
    prefix = f".{name}{OLD_TAG}"
    try:
        entries = sorted(e for e in os.listdir(parent) if e.startswith(prefix))
    except OSError:
        return
    if not entries:
        return
    if os.path.lexists(dst):
        for entry in entries:
            if _writer(entry, prefix) == "dead":
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        return
    # a running writer of this host is between its renames: its business (it puts the copy back on failure)
    copies = [e for e in entries if _writer(e, prefix) != "alive" and os.path.isdir(os.path.join(parent, e, name))]
    if len(copies) > 1:
        log.warning("%s is missing and %d earlier copies lie beside it (%s); none restored: move the one to keep "
                    "to %s", dst, len(copies), ", ".join(copies), dst)
        return
    if not copies:
        return
    aside = os.path.join(parent, copies[0])
    try:
        os.rename(os.path.join(aside, name), dst)
    except OSError as e:
        log.warning("%s is missing and could not be restored from %s (%s)", dst, aside, _os_reason(e))
        return
    _fsync_dir(parent)
    shutil.rmtree(aside, ignore_errors=True)
    print(f"restored {dst} from {aside}: an earlier write stopped between moving it aside and publishing its "
          "replacement; this is the last complete copy", file=sys.stderr, flush=True)


def _publish(tmp: str, dst: str, overwrite: bool) -> None:
    parent, name = os.path.dirname(dst), os.path.basename(dst)
    if os.path.isdir(dst) and os.listdir(dst):
        if not overwrite:  # re-checked: someone wrote there while we were working
            raise DestinationError(f"{dst} was filled while this directory was being written; not replaced")
        old = tempfile.mkdtemp(prefix=f".{name}{OLD_TAG}{_HOST}-{os.getpid()}-", dir=parent)
        os.rename(dst, os.path.join(old, name))
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(os.path.join(old, name), dst)  # put the old copy back; the caller removes tmp
            os.rmdir(old)
            raise
        _fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)  # POSIX: replaces an empty directory in the same atomic step
        _fsync_dir(parent)
