"""Fetch an official dataset release: `python -m model_zoo.data.download <dataset>`.

`<dataset>` is a release name (`python -m model_zoo.data.download --list`) or a dataset_id of
the config folder whose entry names a `release:`. Files are downloaded with a progress bar to
`<name>.part`, resumed with an HTTP Range request after a broken connection (in the same run,
up to `--retries` times, or by running the command again), checked against the size and the
checksum when they are published, and renamed into place; zip archives are unpacked into the
raw folder (`data/<release folder>/raw`, the dataset config's `raw_dir`), a single top-level
folder of the archive being dropped. `download_manifest.json` in the raw folder records each
file's URL, size, md5 and sha256 (for releases without a published checksum this is the
record of the first download, verified on later runs).

Without internet access the command stops at the first connection error and says which URL to
fetch by hand and where to put the file; running it again then verifies and unpacks that file.
"""
import argparse
import hashlib
import http.client
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Optional

from tqdm import tqdm


class DownloadError(RuntimeError):
    """A download failed, was interrupted, or does not match its published size / checksum."""


class Unreachable(DownloadError):
    """The server cannot be reached (no internet access, DNS failure, refused connection)."""


class _Interrupted(Exception):
    """The connection broke in the middle of the body (the .part file is kept for resuming)."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a release.

    url: where to fetch it. name: local file name. size / md5 / sha256: published values
    (None = unknown; then the first download is recorded in the manifest). unpack: a zip archive
    to extract into the raw folder (the archive is kept next to the raw folder).
    """
    url: str
    name: str
    size: Optional[int] = None
    md5: Optional[str] = None
    sha256: Optional[str] = None
    unpack: bool = False


@dataclass(frozen=True)
class Release:
    """An official dataset release: its files and the folder `data/<folder>/raw` they go to."""
    title: str
    homepage: str
    folder: str
    files: tuple


GROUPLENS = "https://files.grouplens.org/datasets/movielens/"
DEEZER_ZENODO = "https://zenodo.org/records/5121674/files/"
RECZOO_HF = "https://huggingface.co/datasets/reczoo/"


def _deezer_files(space):
    names = [f"user_features_{split}_{space}.parquet" for split in ("train", "validation", "test")]
    return tuple(RemoteFile(url=f"{DEEZER_ZENODO}{name}?download=1", name=name)
                 for name in names + ["song_embeddings.parquet"])


def _bars_files(name):
    return tuple(RemoteFile(url=f"{RECZOO_HF}{name}/resolve/main/{f}", name=f) for f in ("train.txt", "test.txt"))


# Published checksums: GroupLens serves `<zip>.md5` next to each archive; the values below are
# those (ML-100K and ML-10M sizes as well). Zenodo / Hugging Face files: recorded on first download.
RELEASES = {
    "ml100k": Release("MovieLens 100K (GroupLens)", "https://grouplens.org/datasets/movielens/100k/", "ml100k",
                      (RemoteFile(GROUPLENS + "ml-100k.zip", "ml-100k.zip", size=4924029,
                                  md5="0e33842e24a9c977be4e0107933c0723", unpack=True),)),
    "ml1m": Release("MovieLens 1M (GroupLens)", "https://grouplens.org/datasets/movielens/1m/", "ml1m",
                    (RemoteFile(GROUPLENS + "ml-1m.zip", "ml-1m.zip", md5="c4d9eecfca2ab87c1945afe126590906",
                                unpack=True),)),
    "ml10m": Release("MovieLens 10M (GroupLens)", "https://grouplens.org/datasets/movielens/10m/", "ml10m",
                     (RemoteFile(GROUPLENS + "ml-10m.zip", "ml-10m.zip", size=65566137,
                                 md5="ce571fd55effeba0271552578f2648bd", unpack=True),)),
    "deezer_ttsvd": Release("Deezer user cold start, TT-SVD features (zenodo 5121674)",
                            "https://zenodo.org/records/5121674", "deezer", _deezer_files("svd")),
    "deezer_utals": Release("Deezer user cold start, UT-ALS features (zenodo 5121674)",
                            "https://zenodo.org/records/5121674", "deezer", _deezer_files("mf")),
    "gowalla_m1": Release("BARS Gowalla_m1", RECZOO_HF + "Gowalla_m1", "gowalla_m1", _bars_files("Gowalla_m1")),
    "yelp18_m1": Release("BARS Yelp18_m1", RECZOO_HF + "Yelp18_m1", "yelp18_m1", _bars_files("Yelp18_m1")),
    "amazonbooks_m1": Release("BARS AmazonBooks_m1", RECZOO_HF + "AmazonBooks_m1", "amazonbooks_m1",
                              _bars_files("AmazonBooks_m1")),
}
MANIFEST = "download_manifest.json"


def default_raw_dir(release, data_root="./data/"):
    """Where `release` is unpacked by default: `<data_root>/<folder>/raw`."""
    return os.path.join(data_root, RELEASES[release].folder, "raw")


def file_digests(path):
    """Size, md5 and sha256 of a file (read once)."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as fd:
        for chunk in iter(lambda: fd.read(1 << 20), b""):
            md5.update(chunk)
            sha.update(chunk)
    return {"bytes": os.path.getsize(path), "md5": md5.hexdigest(), "sha256": sha.hexdigest()}


def verify(path, size=None, md5=None, sha256=None, recorded=None):
    """Digests of `path`; raise DownloadError if they differ from the published (or recorded) ones."""
    digests = file_digests(path)
    expected = {"bytes": size, "md5": md5, "sha256": sha256}
    for key in ("bytes", "md5", "sha256"):
        if expected[key] is None and recorded:
            expected[key] = recorded.get(key)
    for key, value in expected.items():
        if value is not None and digests[key] != value:
            raise DownloadError(f"{path}: {key} is {digests[key]}, expected {value}")
    return digests


def _fetch_once(url, part, size, timeout, progress, chunk_size):
    """Download into `part`, resuming from its current size. Raises _Interrupted on a broken body."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if size is not None and have >= size:
        if have == size:
            return
        have = 0                                   # longer than the release: start over
    headers = {"User-Agent": "sparcode-model-zoo-download"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:               # nothing left to send: the .part is complete
            return
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
        raise Unreachable(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    with response:
        resumed = have and response.status == 206 and \
            (response.headers.get("Content-Range") or "").startswith(f"bytes {have}-")
        if not resumed:
            have = 0                               # the server ignored the Range: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else size
        written = 0
        with open(part, "ab" if resumed else "wb") as fd, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=os.path.basename(part[:-len(".part")]), disable=not progress, leave=False) as bar:
            while True:
                try:
                    chunk = response.read(chunk_size)
                except (http.client.IncompleteRead, socket.timeout, ConnectionError, OSError) as exc:
                    raise _Interrupted(f"{type(exc).__name__}: {exc}") from None
                if not chunk:
                    break
                fd.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        if length is not None and written < int(length):
            raise _Interrupted(f"connection closed after {written} of {length} bytes")


def fetch(url, dest, size=None, md5=None, sha256=None, timeout=20.0, retries=3, backoff=2.0, progress=True,
          chunk_size=1 << 20):
    """Download `url` to `dest` with resume and verification. Returns the file's digests.

    Args:
        url: the file's URL (http or https).
        dest: final path; the download goes to `dest + ".part"` and is renamed when verified.
        size, md5, sha256: published values to check (None = not checked).
        timeout: seconds to wait for the connection and for each read.
        retries: how many times a broken transfer is resumed in this call.
        backoff: seconds to wait before the first retry (doubled each time, at most 30).
        progress: show a tqdm progress bar.
        chunk_size: bytes read at a time.
    Raises:
        DownloadError: unreachable server (with instructions for a manual download), HTTP error,
            transfer still broken after `retries` resumes (the .part file is kept), or a size /
            checksum mismatch (the .part file is deleted).
    """
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    attempt = 0
    while True:
        try:
            _fetch_once(url, part, size, timeout, progress, chunk_size)
            break
        except _Interrupted as exc:
            attempt += 1
            kept = os.path.getsize(part) if os.path.exists(part) else 0
            if attempt > retries:
                raise DownloadError(f"{url}: transfer interrupted ({exc}); {kept} bytes kept in {part}; run the "
                                    f"command again to resume") from None
            time.sleep(min(backoff * 2 ** (attempt - 1), 30.0))
    try:
        digests = verify(part, size, md5, sha256)
    except DownloadError as exc:
        os.remove(part)
        raise DownloadError(f"{url}: downloaded file does not match the release ({exc}); it was deleted, run the "
                            f"command again to download it anew") from None
    os.replace(part, dest)
    return digests


def _safe_members(archive, zf):
    members = []
    for info in zf.infolist():
        name = info.filename.replace("\\", "/")
        if info.is_dir() or name.startswith("__MACOSX/") or os.path.basename(name).startswith("._"):
            continue
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or ":" in parts[0]:
            raise DownloadError(f"{archive}: member {info.filename!r} would be written outside the raw folder")
        members.append((info, parts))
    if not members:
        raise DownloadError(f"{archive}: the archive holds no file")
    return members


def unpack_zip(archive, raw_dir):
    """Extract `archive` into `raw_dir`, dropping a single top-level folder. Returns the files written."""
    os.makedirs(raw_dir, exist_ok=True)
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{archive}: not a zip archive ({exc})") from None
    with zf:
        members = _safe_members(archive, zf)
        tops = {parts[0] for _, parts in members}
        strip = 1 if len(tops) == 1 and all(len(parts) > 1 for _, parts in members) else 0
        staging = tempfile.mkdtemp(prefix=".unpack-", dir=raw_dir)
        written = []
        try:
            for info, parts in members:
                relative = os.path.join(*parts[strip:])
                target = os.path.join(staging, relative)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                written.append(relative)
            for relative in written:
                final = os.path.join(raw_dir, relative)
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.replace(os.path.join(staging, relative), final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return sorted(written)


def _read_manifest(raw_dir):
    path = os.path.join(raw_dir, MANIFEST)
    try:
        with open(path) as fd:
            return json.load(fd)
    except (OSError, json.JSONDecodeError):
        return {"files": {}}


def _write_manifest(raw_dir, manifest):
    path = os.path.join(raw_dir, MANIFEST)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fd:
        json.dump(manifest, fd, indent=2, sort_keys=True)
    os.replace(tmp, path)


def download_release(name, raw_dir=None, data_root="./data/", timeout=20.0, retries=3, backoff=2.0,
                     progress=True, log=print):
    """Fetch, verify and unpack every file of release `name` into `raw_dir`.

    Archives are stored next to the raw folder (`<raw_dir>/../<archive>`), other files inside it.
    Files already present are verified instead of downloaded again. Returns `raw_dir`.
    """
    if name not in RELEASES:
        raise DownloadError(f"unknown release {name!r}; known releases: {', '.join(sorted(RELEASES))}")
    release = RELEASES[name]
    raw_dir = raw_dir or default_raw_dir(name, data_root)
    os.makedirs(raw_dir, exist_ok=True)
    manifest = _read_manifest(raw_dir)
    for remote in release.files:
        folder = os.path.dirname(os.path.abspath(raw_dir)) if remote.unpack else raw_dir
        dest = os.path.join(folder, remote.name)
        recorded = manifest["files"].get(remote.name)
        if os.path.exists(dest):
            log(f"{remote.name}: already present, verifying")
            try:
                digests = verify(dest, remote.size, remote.md5, remote.sha256, recorded)
            except DownloadError as exc:
                raise DownloadError(f"{exc}: this is not the file of the release; delete it and run the command "
                                    f"again") from None
        else:
            log(f"{remote.name}: downloading {remote.url}")
            try:
                digests = fetch(remote.url, dest, remote.size, remote.md5, remote.sha256, timeout=timeout,
                                retries=retries, backoff=backoff, progress=progress)
            except Unreachable as exc:
                raise Unreachable(f"{exc}. Without internet access, download the files by hand and put them "
                                  f"where they belong, then run the command again (it verifies and unpacks what "
                                  f"it finds):\n" + manual_instructions(name, raw_dir)) from None
        published = [k for k, v in (("bytes", remote.size), ("md5", remote.md5), ("sha256", remote.sha256)) if v]
        if not published and not recorded:
            log(f"{remote.name}: no published checksum; recorded sha256 {digests['sha256']} "
                f"({digests['bytes']} bytes) in {os.path.join(raw_dir, MANIFEST)}")
        entry = dict(digests, url=remote.url, path=os.path.abspath(dest), checked_against=published or ["record"])
        if remote.unpack:
            same = recorded and recorded.get("sha256") == digests["sha256"] and all(
                os.path.exists(os.path.join(raw_dir, f)) for f in recorded.get("unpacked", []))
            entry["unpacked"] = recorded["unpacked"] if same else unpack_zip(dest, raw_dir)
            log(f"{remote.name}: {len(entry['unpacked'])} file(s) in {raw_dir}")
        manifest["files"][remote.name] = entry
        manifest["release"] = name
        _write_manifest(raw_dir, manifest)
    return raw_dir


def manual_instructions(name, raw_dir):
    """One line per file of release `name`: URL -> where to put it."""
    lines = []
    for remote in RELEASES[name].files:
        folder = os.path.dirname(os.path.abspath(raw_dir)) if remote.unpack else os.path.abspath(raw_dir)
        lines.append(f"  {remote.url}  ->  {os.path.join(folder, remote.name)}")
    return "\n".join(lines)


def _resolve(name, config_dir, data_root, raw_dir):
    """A release name or a dataset_id of the config -> (release, raw_dir)."""
    if name in RELEASES:
        return name, raw_dir or default_raw_dir(name, data_root)
    from ..config import DATASET_DEFAULTS, load_dataset_config
    from ..errors import ConfigError
    try:
        entry = load_dataset_config(config_dir, name)
    except ConfigError:
        raise DownloadError(f"{name!r} is neither a release ({', '.join(sorted(RELEASES))}) nor a dataset_id of "
                            f"{config_dir}") from None
    release = entry.get("release")
    if release not in RELEASES:
        raise DownloadError(f"dataset_id={name} in {entry['_dataset_config_file']} has release={release!r}: nothing "
                            f"to download; put its raw files in its raw_dir by hand (see data/README.md)")
    root = entry.get("data_root", DATASET_DEFAULTS["data_root"])
    return release, raw_dir or entry.get("raw_dir") or os.path.join(root, name, "raw")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m model_zoo.data.download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", help="release name or dataset_id of the config")
    parser.add_argument("--list", action="store_true", help="list the releases and exit")
    parser.add_argument("--config", default="./config/", help="config folder (to resolve a dataset_id)")
    parser.add_argument("--data-root", default="./data/", help="root of the data folders")
    parser.add_argument("--raw-dir", default=None, help="unpack here instead of <data-root>/<folder>/raw")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for the server")
    parser.add_argument("--retries", type=int, default=3, help="resumes of a broken transfer in this run")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.list or not args.dataset:
        for name, release in sorted(RELEASES.items()):
            print(f"{name:16s} {release.title}  ->  {default_raw_dir(name, args.data_root)}  ({release.homepage})")
        return 0 if args.list else 2
    try:
        release, raw_dir = _resolve(args.dataset, args.config, args.data_root, args.raw_dir)
        download_release(release, raw_dir, timeout=args.timeout, retries=args.retries,
                         progress=not args.no_progress)
    except DownloadError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    print(f"Done: {release} is in {raw_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
