"""Getting a raw file: an archive the user points at, one already in the data folder, or a download.

Downloads are retried, checked against the published size and checksum where known (a mismatch
fails), and appear under their name only when complete. A file the user supplies is checked too,
but a mismatch only warns: other versions (or a reconstruction) may be used on purpose.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Tuple

from generative_recommenders.data.parsing import Log, PreprocessingError, mib, print_log
from generative_recommenders.files import atomic_write, remove_stale_temporaries


class Checksum(NamedTuple):
    algorithm: str  # a hashlib name: "md5" (what GroupLens publishes) or "sha256"
    hexdigest: str


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """Where a raw file comes from and what the official file looks like."""

    url: str
    size: Optional[int] = None  # bytes of the official file, where known
    checksum: Optional[Checksum] = None

    @property
    def archive_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def is_zip(self) -> bool:
        return self.archive_name.endswith(".zip")


def file_digest(path: Path, algorithm: str, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def how_to_supply(remote: RemoteFile, data_dir: str | Path) -> str:
    return (f"if this machine cannot download it, fetch {remote.url} elsewhere and pass it with "
            f"--archive=/path/to/{remote.archive_name}, or put it at {Path(data_dir) / remote.archive_name}")


class _RetryableDownloadError(Exception):
    pass


def _fetch(url: str, tmp: Path, expected_size: Optional[int], expected_checksum: Optional[Checksum],
           timeout_s: float, check: Optional[Callable[[Path], None]], log: Log) -> None:
    """One download attempt into `tmp`; raises on any failure."""
    digest = hashlib.new(expected_checksum.algorithm if expected_checksum else "sha256")
    done = 0
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as out:
        announced = int(response.headers.get("Content-Length") or 0)
        if announced and expected_size is not None and announced != expected_size:
            raise PreprocessingError(f"{url}: the server announces {announced:,} bytes, the known file has "
                                     f"{expected_size:,}; it changed upstream (nothing was downloaded)")
        total = announced or expected_size
        last_report = time.monotonic()
        while chunk := response.read(1 << 20):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if time.monotonic() - last_report >= 2.0:
                last_report = time.monotonic()
                share = f" ({100 * done / total:.0f}%)" if total else ""
                log(f"  downloaded {mib(done)} / {mib(total) if total else '?'}{share}")
    log(f"  downloaded {mib(done)} / {mib(total) if total else '?'}")
    if announced and done != announced:
        raise _RetryableDownloadError(f"connection closed after {done:,} of {announced:,} bytes")
    if expected_size is not None and done != expected_size:
        raise _RetryableDownloadError(f"got {done:,} bytes, expected {expected_size:,}")
    if expected_checksum is not None and digest.hexdigest() != expected_checksum.hexdigest:
        raise PreprocessingError(
            f"{url}: {expected_checksum.algorithm} {digest.hexdigest()} differs from the known "
            f"{expected_checksum.hexdigest}; the download is corrupt or the file changed upstream (nothing was kept)")
    if check is not None:
        check(tmp)


def download(url: str, dest: str | Path, *, expected_size: Optional[int] = None,
             expected_checksum: Optional[Checksum] = None, attempts: int = 3, backoff_s: float = 2.0,
             timeout_s: float = 60.0, check: Optional[Callable[[Path], None]] = None,
             supply_hint: str = "", log: Log = print_log) -> Path:
    """Downloads `url` to `dest` with retries; the file appears under its name only when complete and verified."""
    dest = Path(dest)
    remove_stale_temporaries(dest)
    delay = backoff_s
    last_error: Optional[BaseException] = None
    for attempt in range(1, attempts + 1):
        log(f"downloading {url} -> {dest} (attempt {attempt} of {attempts})")
        try:
            # atomic_write keeps the bytes in a hidden temporary file, deleted on failure.
            atomic_write(dest, lambda tmp: _fetch(url, tmp, expected_size, expected_checksum, timeout_s, check, log),
                         suffix=".part")
            return dest
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code not in (408, 429):  # the server's answer will not change
                raise PreprocessingError(
                    f"could not download {url}: HTTP {exc.code} {exc.reason}; {supply_hint}") from exc
            last_error = exc
        except (urllib.error.URLError, OSError, http.client.HTTPException, _RetryableDownloadError) as exc:
            last_error = exc
        if attempt < attempts:
            log(f"  download failed ({last_error}); retrying in {delay:.0f} s")
            time.sleep(delay)
            delay *= 2
    raise PreprocessingError(f"could not download {url} after {attempts} attempts ({last_error}); "
                             f"{supply_hint or 'pass the file with --archive=PATH'}")


def check_zip(path: Path) -> None:
    """Reads every member once (CRC checks): catches truncated or damaged downloads."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise PreprocessingError(f"the downloaded archive is not a valid zip file ({exc})") from exc
    if bad is not None:
        raise PreprocessingError(f"the downloaded archive has a corrupt member {bad}")


def check_local_file(remote: RemoteFile, path: Path, log: Log) -> None:
    """Warns (only) when a file supplied by the user is not the official one: other versions are allowed."""
    if path.is_dir() or (remote.size is None and remote.checksum is None):
        return
    differs = f"WARNING: {path} differs from the official archive {remote.archive_name}"
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:  # no need to hash a file of the wrong size
        log(f"{differs}: it has {size:,} bytes, the official one {remote.size:,}; using it anyway")
        return
    if remote.checksum is None:
        log(f"{path}: its size matches the official archive (no published checksum to compare)")
        return
    algorithm, expected = remote.checksum
    digest = file_digest(path, algorithm)
    if digest != expected:
        log(f"{differs}: its {algorithm} is {digest}, the official one {expected}; using it anyway")
    else:
        log(f"{path}: size and {algorithm} match the official archive")


def locate_archive(name: str, remote: RemoteFile, data_dir: str | Path, archive: Optional[str | Path] = None, *,
                   allow_download: bool = True, log: Log = print_log) -> Path:
    """The raw archive to read: `archive` if given, else `<data_dir>/<archive name>`, downloading it if missing."""
    if archive is not None:
        path = Path(archive).expanduser()
        if not path.exists():
            raise PreprocessingError(f"--archive={archive}: no such file")
        check_local_file(remote, path, log)
        return path
    path = Path(data_dir) / remote.archive_name
    if path.exists():
        log(f"{name}: using {path} (already on disk)")
        check_local_file(remote, path, log)
        return path
    if not allow_download:
        raise PreprocessingError(f"{name}: {path} does not exist; {how_to_supply(remote, data_dir)}")
    return download(remote.url, path, expected_size=remote.size, expected_checksum=remote.checksum,
                    check=check_zip if remote.is_zip else None, supply_hint=how_to_supply(remote, data_dir), log=log)


def read_member(archive: Path, folder: str, filename: str) -> Tuple[bytes, str]:
    """Bytes of `folder/filename` in a zip archive (or in a folder where it was extracted), and a label for errors."""
    if archive.is_dir():
        for candidate in (archive / folder / filename, archive / filename):
            if candidate.is_file():
                return candidate.read_bytes(), str(candidate)
        raise PreprocessingError(f"{archive}: missing {folder}/{filename} in this folder")
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            member = f"{folder}/{filename}"
            if member not in names:  # also accept an archive re-packed without the folder
                others = [n for n in names if n == filename or n.endswith("/" + filename)]
                if len(others) != 1:
                    raise PreprocessingError(f"{archive}: missing member {member} in the zip archive "
                                             f"(it has {len(names)} members: {', '.join(names[:8])})")
                member = others[0]
            label = f"{archive}:{member}"
            try:
                return zf.read(member), label
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise PreprocessingError(f"{label}: the zip archive is corrupt ({exc}); download it again") from exc
    except (zipfile.BadZipFile, EOFError) as exc:
        raise PreprocessingError(f"{archive}: not a valid zip archive, truncated or corrupt ({exc}); "
                                 "download it again") from exc
