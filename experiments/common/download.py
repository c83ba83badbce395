"""Downloads that survive real networks: resume, retries, a timeout, verification before the rename.

:func:`download` writes ``<dest>.part``; after a dropped connection, a stall (``timeout`` seconds without
data) or a server error it waits (exponential back-off) and continues the same file with an HTTP
``Range: bytes=<have>-`` request, checking that the server's ``Content-Range`` starts where the file ends
(a server that ignores ``Range`` and answers 200 restarts the file from zero). Only a file whose size
(the expected ``size``, and the server's own length) and digest (``sha256`` / ``md5``) match is renamed to
``dest``; a mismatch deletes the ``.part`` and raises :class:`ChecksumError`. A ``.part`` left by an earlier,
killed run is resumed; if the finished file then fails its checksum the download is redone once from zero
(the server's file may have changed in between). Local copies and mirrors: ``url`` may also be a
``file://`` URL or a plain path, copied (and resumed) the same way. Two processes downloading the same
``dest`` take turns (a lock file beside it): the second finds the verified file.

Library choice: the standard library's ``urllib``. requests/urllib3's ``Retry`` re-sends a failed
*request* but cannot continue a body cut mid-transfer: the Range request, the ``Content-Range`` check and
the ``.part`` bookkeeping would be ours anyway, so the library would add a dependency for no less code.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from .errors import ExperimentError
from .locking import exclusive

__all__ = ["DownloadError", "ChecksumError", "download", "file_digest", "verify_file"]

USER_AGENT = "linattn_cuda-experiments (python urllib)"
RETRIABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(ExperimentError):
    """The file could not be fetched (network, server, missing source) after the allowed retries."""


class ChecksumError(ExperimentError):
    """A file's size or digest is not the expected one."""


class _Retry(Exception):
    """A transfer failure worth another attempt (the ``.part`` keeps what arrived)."""


# ------------------------------------------------------------------------------------------- progress

class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: Optional[int], desc: str, enabled: bool, initial: int = 0):
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # progress bars are optional: the experiments' requirements bring tqdm
            return _NoBar()
        return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, dynamic_ncols=True)
    return _NoBar()


# ------------------------------------------------------------------------------------------ checksums

def file_digest(path: os.PathLike | str, algorithm: str = "sha256", *, progress: bool = False, chunk: int = 8 << 20) -> str:
    """Hex digest (``sha256``, ``md5``, any :mod:`hashlib` name) of a file, read in chunks."""
    path = Path(path)
    digest = hashlib.new(algorithm)
    bar = _bar(path.stat().st_size, f"{algorithm} {path.name}", progress)
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
                bar.update(len(block))
    finally:
        bar.close()
    return digest.hexdigest()


def verify_file(path: os.PathLike | str, *, sha256: Optional[str] = None, md5: Optional[str] = None,
                size: Optional[int] = None, progress: bool = False, hint: str = "") -> None:
    """Raise :class:`ChecksumError` (naming the file, the expected and the found value) unless ``path`` has
    the given size and digests; ``None`` skips a check. ``hint`` is appended to the message (what to do)."""
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    if size is not None and path.stat().st_size != size:
        raise ChecksumError(f"{path} has {path.stat().st_size:,} bytes, expected {size:,} (truncated or another file){suffix}")
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected:
            got = file_digest(path, algorithm, progress=progress)
            if got.lower() != expected.lower():
                raise ChecksumError(f"{path}: {algorithm} {got} does not match the expected {expected.lower()}{suffix}")


# -------------------------------------------------------------------------------------------- transfer

def _local_source(url: str) -> Optional[Path]:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if not parsed.scheme or (len(parsed.scheme) == 1 and os.name == "nt"):  # a plain path (or a Windows drive)
        return Path(url)
    return None


def _copy_local(source: Path, part: Path, have: int, chunk: int, bar) -> Optional[int]:
    """Append ``source[have:]`` to ``part``; returns the source's size."""
    if not source.is_file():
        raise DownloadError(f"{source}: no such file (given as the download URL)")
    total = source.stat().st_size
    if have > total:
        part.unlink()
        have = 0
    with open(source, "rb") as src, open(part, "ab" if have else "wb") as out:
        src.seek(have)
        while block := src.read(chunk):
            out.write(block)
            bar.update(len(block))
    return total


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _fetch_http(url: str, part: Path, have: int, timeout: float, chunk: int, progress: bool, desc: str) -> Optional[int]:
    """One request: append what the server sends to ``part``; returns the full file's size when known.

    Raises :class:`_Retry` for failures worth another attempt and :class:`DownloadError` for the others.
    """
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left after `have`: complete, or a longer stale .part
            match = re.search(r"/(\d+)", e.headers.get("Content-Range", "") or "")
            if match and int(match.group(1)) == have:
                return have
            part.unlink()
            raise _Retry(f"HTTP 416 for a resume at byte {have}; starting the file again") from e
        if e.code in RETRIABLE_STATUS:
            raise _Retry(f"HTTP {e.code} {e.reason}") from e
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise _Retry(f"{type(reason).__name__}: {reason}") from e
    with response:
        status = getattr(response, "status", 200)
        length = response.headers.get("Content-Length")
        if have and status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:
                part.unlink()
                raise _Retry(f"the server resumed at {response.headers.get('Content-Range')!r}, not at byte {have}; starting again")
            total = None if match.group(3) == "*" else int(match.group(3))
            mode = "ab"
        else:  # 200: the whole file (a server that ignores Range included)
            have, mode = 0, "wb"
            total = int(length) if length and length.isdigit() else None
        bar = _bar(total, desc, progress, initial=have)
        try:
            with open(part, mode) as out:
                while True:
                    try:
                        block = response.read(chunk)
                    except (OSError, http.client.HTTPException) as e:  # timeout, reset, IncompleteRead
                        raise _Retry(f"{type(e).__name__}: {e}") from e
                    if not block:
                        break
                    out.write(block)
                    bar.update(len(block))
        finally:
            bar.close()
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Retry(f"connection closed after {got:,} of {total:,} bytes")
    return total


def download(
    url: str,
    dest: os.PathLike | str,
    *,
    sha256: Optional[str] = None,
    md5: Optional[str] = None,
    size: Optional[int] = None,
    retries: int = 8,
    timeout: float = 60.0,
    backoff: float = 1.0,
    max_backoff: float = 60.0,
    force: bool = False,
    progress: bool = True,
    chunk: int = 1 << 20,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Fetch ``url`` to ``dest`` (see the module docstring); returns ``dest``.

    An existing ``dest`` that passes the checks is reused (``force=True``: fetched again and replaced only
    once the new copy is verified); one that fails them is fetched again. ``retries``: attempts allowed
    after consecutive failures without new data (a transfer that makes progress resets the count), waiting
    ``backoff * 2**k`` seconds (at most ``max_backoff``) in between. ``timeout``: seconds without an answer
    or data before an attempt counts as failed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(dest.with_name(dest.name + ".download.lock"), f"downloading {dest}", log):
        if dest.exists() and not force:
            try:
                verify_file(dest, sha256=sha256, md5=md5, size=size, progress=progress)
                return dest
            except ChecksumError as e:
                log(f"{e}; downloading it again")
        part = dest.with_name(dest.name + ".part")
        source = _local_source(url)
        if source is not None and dest.exists() and source.resolve() == dest.resolve():
            raise DownloadError(f"{url} is the destination itself and does not pass its check")
        restarted = False
        while True:
            resumed = part.exists() and part.stat().st_size > 0
            _transfer(url, source, part, retries, timeout, backoff, max_backoff, progress, chunk, log, sleep, dest.name)
            try:
                verify_file(part, sha256=sha256, md5=md5, size=size, progress=progress)
            except ChecksumError as e:
                part.unlink()
                if resumed and not restarted:  # the older part may belong to another version of the file
                    log(f"{e}; the download had resumed an earlier {part.name}, so fetching it again from the start")
                    restarted = True
                    continue
                raise ChecksumError(f"{e} (downloaded from {url}; the file was deleted)") from None
            os.replace(part, dest)
            return dest


def _transfer(url, source, part: Path, retries, timeout, backoff, max_backoff, progress, chunk, log, sleep, name) -> None:
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        try:
            if source is not None:
                bar = _bar(None, f"copy {name}", progress, initial=have)
                try:
                    _copy_local(source, part, have, chunk, bar)
                finally:
                    bar.close()
            else:
                _fetch_http(url, part, have, timeout, chunk, progress, f"download {name}")
            return
        except _Retry as e:
            now = part.stat().st_size if part.exists() else 0
            failures = 1 if now > have else failures + 1
            if failures > retries:
                raise DownloadError(f"{url}: {e}; gave up after {retries} retries "
                                    f"({now:,} bytes kept in {part}: rerun to resume)") from None
            wait = min(backoff * 2 ** (failures - 1), max_backoff)
            log(f"download of {name} interrupted ({e}); {now:,} bytes so far, resuming in {wait:g} s "
                f"(retry {failures}/{retries})")
            sleep(wait)
