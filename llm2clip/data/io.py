"""Opening shards by local path or URL, with byte counting and retries.

`open_shard(url)` is the one way the data code opens a shard (image tar, sidecar tar, `sizes.json`):

- a local path (or `file://`): an unbuffered, seekable file; seeks over member data cost nothing;
- `http(s)://`, `gs://`, `pipe:CMD` (webdataset's convention, e.g. `pipe:aws s3 cp s3://b/k.tar -`):
  opened with webdataset's `gopen` (curl / gsutil / a shell command), read as a forward-only stream;
- `s3://b/k`: opened as `pipe:aws s3 cp s3://b/k -`, the command webdataset's docs use (gopen has no
  s3 scheme and fsspec's s3fs is not a dependency).

A remote stream that fails while being opened or read (connection reset, curl/aws exiting nonzero,
an HTTP error) is reopened after a backoff of `backoff * 2**attempt` seconds and resumed at the byte
it had reached: the reopened stream re-reads and discards that prefix (gopen's openers have no range
requests; the discarded bytes count in `bytes_read`, they are transferred). After `retries` failed
reopens the last error is raised as OSError, which the tar reader turns into a skipped, counted and
named shard (`ReadStats.read_errors`). Defaults: `LLM2CLIP_SHARD_RETRIES` (5) and
`LLM2CLIP_SHARD_BACKOFF` (1.0 s) from the environment, so loader worker processes see them too.
(For http(s), curl as gopen runs it also retries HTTP 408/429/5xx itself, 30 times 2 s apart, before
it reports a failure here; a 404 fails at once.)

Every returned object has `bytes_read`: the bytes actually read from the source (for a local file,
seeks over data do not count).
"""
from __future__ import annotations

import io
import logging
import os
import shlex
import time
from typing import Callable

log = logging.getLogger("llm2clip")

REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "pipe:")


def is_url(spec: str) -> bool:
    """True for the remote forms open_shard accepts (not for local paths or file://)."""
    return spec.startswith(REMOTE_PREFIXES)


def local_path(spec: str) -> str:
    """The filesystem path of a local spec (`file://` stripped, `~` expanded)."""
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    return os.path.expanduser(spec)


def shard_location(spec: str) -> str:
    """Where a shard lives, for naming things after it (its sidecar): the spec itself, or for a
    `pipe:` command the last word of it that names a tar (`pipe:aws s3 cp s3://b/x.tar -` ->
    `s3://b/x.tar`). ValueError when a command names none."""
    if not spec.startswith("pipe:"):
        return spec
    words = [w for w in shlex.split(spec[len("pipe:"):]) if ".tar" in w.rsplit("/", 1)[-1]]
    if not words:
        raise ValueError(f"shard '{spec}': the pipe command names no .tar file to name its sidecar after")
    return words[-1]


class CountingFile(io.RawIOBase):
    """An unbuffered local file that counts the bytes read through it (a tar header is one 512-byte
    read; member data passed over is one seek and counts nothing)."""

    def __init__(self, path: str):
        self.name = path
        self.f = open(local_path(path), "rb", buffering=0)
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.bytes_read += n or 0
        return n

    def seek(self, off: int, whence: int = 0) -> int:
        return self.f.seek(off, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()
        super().close()


def _gopen_url(url: str) -> str:
    if url.startswith("s3://"):
        return "pipe:aws s3 cp " + shlex.quote(url) + " -"
    return url


class RemoteShard(io.RawIOBase):
    """A forward-only stream over a remote shard that retries with backoff and resumes at its byte
    position (see the module docstring). `tell()` is the position in the shard; not seekable."""

    def __init__(self, url: str, retries: int | None = None, backoff: float | None = None,
                 opener: Callable[[str], object] | None = None):
        self.name = url
        self.retries = int(os.environ.get("LLM2CLIP_SHARD_RETRIES", 5)) if retries is None else retries
        self.backoff = float(os.environ.get("LLM2CLIP_SHARD_BACKOFF", 1.0)) if backoff is None else backoff
        self.bytes_read = 0  # bytes received, re-read prefixes after a retry included
        self.retried = 0  # reopens so far
        self.pos = 0
        self._f = None
        self._eof = False
        if opener is None:
            from webdataset.gopen import gopen
            opener = gopen
        self._opener = opener

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.pos

    def _open(self) -> None:
        f = self._opener(_gopen_url(self.name))
        todo = self.pos
        try:
            while todo:  # resume: the opener has no ranges, so re-read and discard what we had
                chunk = f.read(min(todo, 1 << 20))
                if not chunk:
                    raise EOFError(f"{self.name}: stream ended at byte {self.pos - todo} while resuming at {self.pos}")
                self.bytes_read += len(chunk)
                todo -= len(chunk)
        except BaseException:
            _close_quietly(f)
            raise
        self._f = f

    def readinto(self, b) -> int:
        if self._eof or len(b) == 0:
            return 0
        attempt = 0
        while True:
            try:
                if self._f is None:
                    self._open()
                data = self._f.read(len(b))
                if not data:
                    # a pipe reports a failed command (curl's HTTP error, a cut connection) only when
                    # it is waited for: close it now so a failure is an error here, not a short shard
                    f, self._f = self._f, None
                    f.close()
                    self._eof = True
                    return 0
                n = len(data)
                b[:n] = data
                self.pos += n
                self.bytes_read += n
                return n
            except (OSError, EOFError, ValueError) as e:  # gopen raises ValueError for unusable URLs
                if self._f is not None:
                    _close_quietly(self._f)
                    self._f = None
                if attempt >= self.retries:
                    raise OSError(f"{self.name}: giving up after {attempt + 1} attempts at byte {self.pos} "
                                  f"({type(e).__name__}: {e})") from e
                delay = self.backoff * 2 ** attempt
                log.warning(f"{self.name}: read failed at byte {self.pos} ({type(e).__name__}: {e}); "
                            f"retry {attempt + 1}/{self.retries} in {delay:.2f}s")
                time.sleep(delay)
                attempt += 1
                self.retried += 1

    def close(self) -> None:
        if self._f is not None:
            # closed before the end (the reader stopped early): a pipe's exit status says nothing then
            _close_quietly(self._f)
            self._f = None
        super().close()


def _close_quietly(f) -> None:
    try:
        f.close()
    except Exception:  # noqa: BLE001 - closing a half-read pipe may report its killed command
        pass


def open_shard(url: str, retries: int | None = None, backoff: float | None = None) -> io.RawIOBase:
    """A binary file object for a shard path or URL, with `bytes_read` (see the module docstring).

    Local files are opened at once (FileNotFoundError if absent) and are seekable; remote ones open
    on the first read (errors there are retried), are not seekable, and `tell()` gives the position.
    Wrap in io.BufferedReader for many small reads."""
    if is_url(url):
        return RemoteShard(url, retries, backoff)
    return CountingFile(url)


def read_small(url: str, retries: int = 0) -> bytes | None:
    """The whole content of a small file (a `sizes.json`, a manifest) by path or URL, or None when it
    cannot be read. No retries by default: callers use it for optional metadata."""
    try:
        with open_shard(url, retries=retries, backoff=0.2) as f:
            return f.read()
    except (OSError, EOFError, ValueError):
        return None
