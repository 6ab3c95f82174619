"""Outputs appear whole or not at all, on a local disk or at any `etils.epath` location (gs://, s3://).

Locally they are written into a hidden sibling and renamed into place at the end. Object stores have no
rename, but each object write is atomic: a file is sent in one `write_bytes` from memory, and a folder is
written in place, its description last (Orbax commits its own folders with a marker file), so a reader
that checks the description never takes a half-written folder for a whole one. Nor have they append: a
log (`append_file`) is kept in memory there and rewritten whole.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from etils import epath

from flux_jax.io.errors import OutputExistsError


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URI such as gs://bucket/dir, which `etils.epath` reaches and the OS does not."""
    return "://" in os.fspath(path)


def location(path: str | os.PathLike) -> epath.Path:
    """`path` as an `epath.Path`: a URI as it is, a local path absolute (as Orbax wants it)."""
    return epath.Path(path) if is_remote(path) else epath.Path(Path(path).expanduser().absolute())


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` (local or remote) so that a reader finds the old file or the new one."""
    if is_remote(path):
        location(path).write_bytes(data)  # one object write: atomic on GCS and S3
        return
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path | epath.Path]:
    """Yields an empty folder whose contents become `out` when the block succeeds.

    Locally it is a temporary sibling, renamed into place: on any failure it is removed and an existing
    `out` is left untouched. At a remote location it is `out` itself (an existing one is removed first,
    its top-level files before the rest), removed again on failure; the caller writes its description
    file last.
    """
    if is_remote(out):
        with _remote_directory(location(out), overwrite=overwrite) as directory:
            yield directory
        return
    out = Path(out).expanduser().absolute()
    _refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists() or out.is_symlink():  # set aside, not deleted, until the new one is in place
        old = out.parent / f".{out.name}.{tmp.name}.old"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


@contextlib.contextmanager
def _remote_directory(out: epath.Path, *, overwrite: bool) -> Iterator[epath.Path]:
    _refuse_existing(out, overwrite)
    if out.exists():
        for child in out.iterdir():  # descriptions (flux_jax.json, model_index.json) go before their data
            if not child.is_dir():
                child.unlink()
        out.rmtree()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        out.rmtree(missing_ok=True)
        raise


def _refuse_existing(out: Path | epath.Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary local path beside `path`; what is written there becomes `path` when the block
    succeeds, and is removed when it fails. (`write_file` also reaches remote locations.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_file(path: str | os.PathLike, *, upload_secs: float = 30.0) -> BinaryIO:
    """`path` opened for appending bytes (created with its folders if missing), local or remote.

    At a remote location the whole file is kept in memory, starting from what is already there, and
    rewritten in one object write by `flush`, at most every `upload_secs` seconds (GCS takes about one
    write a second to one object), and by `close`."""
    path = location(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _RemoteLog(path, upload_secs) if is_remote(path) else path.open("ab")


def persist(log: BinaryIO) -> None:
    """Makes what `log` (from `append_file`) holds survive the process now, whatever its upload interval.
    A run calls it before each checkpoint: a process killed later (no `close`) then has lost no line
    that the checkpoint covers, and a resumed run finds every one of them."""
    if isinstance(log, _RemoteLog):
        log.flush(force=True)
    else:
        log.flush()


class _RemoteLog(io.BytesIO):
    def __init__(self, path: epath.Path, upload_secs: float):
        super().__init__(path.read_bytes() if path.exists() else b"")
        self._path, self._every, self._sent = path, upload_secs, -float("inf")
        self._sent_size = self.seek(0, io.SEEK_END)

    def flush(self, *, force: bool = False) -> None:
        if self.closed or self.tell() == self._sent_size:
            return
        if force or time.monotonic() - self._sent >= self._every:
            self._path.write_bytes(self.getvalue())
            self._sent, self._sent_size = time.monotonic(), self.tell()

    def close(self) -> None:
        self.flush(force=True)
        super().close()
