"""Downloads against a local HTTP server (127.0.0.1): resume, verification, unpacking, offline."""
import hashlib
import http.server
import io
import json
import os
import socket
import threading
import zipfile

import numpy as np
import pytest

from model_zoo.data import download
from model_zoo.data.download import (DownloadError, Release, RemoteFile, Unreachable, download_release, fetch,
                                     unpack_zip)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files[path]`, honours Range (unless told not to), breaks on request."""

    def do_GET(self):
        server = self.server
        server.seen.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path.split("?")[0])
        if data is None:
            self.send_error(404)
            return
        start, range_header = 0, self.headers.get("Range")
        if range_header and server.honor_range:
            start = int(range_header.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.breaks > 0:                      # send part of the body, then drop the connection
            server.breaks -= 1
            self.wfile.write(body[:server.break_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.seen, httpd.breaks, httpd.break_after, httpd.honor_range = {}, [], 0, 0, True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _payload(n=300_000, seed=0):
    return np.random.RandomState(seed).bytes(n)


def test_broken_download_is_resumed_with_a_range_request(server, tmp_path):
    data = _payload()
    server.files["/big.bin"] = data
    server.breaks, server.break_after = 1, 100_000
    dest = str(tmp_path / "big.bin")
    with pytest.raises(DownloadError, match="interrupted.*run the command again to resume"):
        fetch(server.url + "/big.bin", dest, size=len(data), retries=0, progress=False)
    assert os.path.getsize(dest + ".part") == 100_000 and not os.path.exists(dest)
    digests = fetch(server.url + "/big.bin", dest, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                    retries=0, progress=False)
    assert server.seen[-1] == ("/big.bin", "bytes=100000-")
    assert open(dest, "rb").read() == data and not os.path.exists(dest + ".part")
    assert digests == {"bytes": len(data), "md5": hashlib.md5(data).hexdigest(),
                       "sha256": hashlib.sha256(data).hexdigest()}


def test_retries_resume_within_one_call(server, tmp_path):
    data = _payload(seed=1)
    server.files["/f.bin"] = data
    server.breaks, server.break_after = 2, 70_000
    dest = str(tmp_path / "f.bin")
    fetch(server.url + "/f.bin", dest, md5=hashlib.md5(data).hexdigest(), retries=3, backoff=0, progress=False)
    assert open(dest, "rb").read() == data
    assert [r for _, r in server.seen] == [None, "bytes=70000-", "bytes=140000-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    data = _payload(seed=2)
    server.files["/f.bin"] = data
    server.honor_range = False
    dest = str(tmp_path / "f.bin")
    with open(dest + ".part", "wb") as fd:
        fd.write(b"stale bytes of another file")
    fetch(server.url + "/f.bin", dest, size=len(data), progress=False)
    assert open(dest, "rb").read() == data


def test_checksum_or_size_mismatch_deletes_the_download(server, tmp_path):
    data = _payload(seed=3)
    server.files["/f.bin"] = data
    dest = str(tmp_path / "f.bin")
    with pytest.raises(DownloadError, match="md5 is .* expected 0+"):
        fetch(server.url + "/f.bin", dest, md5="0" * 32, progress=False)
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")
    with pytest.raises(DownloadError, match="bytes is 300000, expected 299999"):
        fetch(server.url + "/f.bin", dest, size=len(data) - 1, progress=False)
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(server.url + "/missing.bin", dest, progress=False)


def _zip_bytes(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buffer.getvalue()


def test_release_is_unpacked_verified_and_recorded(server, tmp_path, monkeypatch):
    archive = _zip_bytes({"ml-tiny/ratings.dat": "1::2::5::10\n", "ml-tiny/movies.dat": "2::A (1999)::Drama\n",
                          "__MACOSX/ml-tiny/._ratings.dat": "junk"})
    server.files["/ml-tiny.zip"] = archive
    server.files["/extra.txt"] = b"1 2 3\n"
    release = Release("tiny", server.url, "tiny", (
        RemoteFile(server.url + "/ml-tiny.zip", "ml-tiny.zip", size=len(archive), unpack=True),
        RemoteFile(server.url + "/extra.txt", "extra.txt")))
    monkeypatch.setitem(download.RELEASES, "tiny", release)
    messages = []
    raw_dir = download_release("tiny", data_root=str(tmp_path / "data"), progress=False, log=messages.append)
    assert raw_dir == os.path.join(str(tmp_path / "data"), "tiny", "raw")
    assert sorted(os.listdir(raw_dir)) == ["download_manifest.json", "extra.txt", "movies.dat", "ratings.dat"]
    assert os.path.exists(tmp_path / "data" / "tiny" / "ml-tiny.zip")          # archive kept beside raw/
    manifest = json.load(open(os.path.join(raw_dir, "download_manifest.json")))
    assert manifest["files"]["extra.txt"]["sha256"] == hashlib.sha256(b"1 2 3\n").hexdigest()
    assert manifest["files"]["ml-tiny.zip"]["unpacked"] == ["movies.dat", "ratings.dat"]
    assert any("no published checksum; recorded sha256" in m for m in messages)
    requests = len(server.seen)
    download_release("tiny", data_root=str(tmp_path / "data"), progress=False, log=messages.append)
    assert len(server.seen) == requests, "files already present are verified, not downloaded again"
    with open(os.path.join(raw_dir, "extra.txt"), "wb") as fd:
        fd.write(b"tampered")
    with pytest.raises(DownloadError, match="extra.txt.*expected.*delete it"):
        download_release("tiny", data_root=str(tmp_path / "data"), progress=False, log=messages.append)


def test_unreachable_server_stops_quickly_and_says_where_to_put_files(tmp_path, monkeypatch):
    with socket.socket() as probe:                  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ml-tiny.zip"
    monkeypatch.setitem(download.RELEASES, "tiny", Release("tiny", url, "tiny", (
        RemoteFile(url, "ml-tiny.zip", unpack=True), RemoteFile(url.replace(".zip", ".txt"), "b.txt"))))
    with pytest.raises(Unreachable) as info:
        download_release("tiny", data_root=str(tmp_path / "data"), timeout=5, progress=False, log=lambda m: None)
    message = str(info.value)
    assert "cannot reach" in message and "by hand" in message
    assert f"{url}  ->  {tmp_path / 'data' / 'tiny' / 'ml-tiny.zip'}" in message
    assert str(tmp_path / "data" / "tiny" / "raw" / "b.txt") in message
    # the CLI turns it into one error and a non-zero exit code
    assert download.main(["tiny", "--data-root", str(tmp_path / "data"), "--no-progress", "--timeout", "5"]) == 1


def test_files_put_by_hand_are_verified_and_unpacked(tmp_path, monkeypatch):
    archive = _zip_bytes({"a/u.data": "1\t2\t5\t10\n"})
    url = "http://127.0.0.1:9/never-contacted.zip"
    monkeypatch.setitem(download.RELEASES, "tiny", Release("tiny", url, "tiny", (
        RemoteFile(url, "t.zip", md5=hashlib.md5(archive).hexdigest(), unpack=True),)))
    (tmp_path / "data" / "tiny").mkdir(parents=True)
    (tmp_path / "data" / "tiny" / "t.zip").write_bytes(archive)
    raw_dir = download_release("tiny", data_root=str(tmp_path / "data"), progress=False, log=lambda m: None)
    assert open(os.path.join(raw_dir, "u.data")).read() == "1\t2\t5\t10\n"


def test_unpack_rejects_members_outside_the_folder(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(_zip_bytes({"../escape.txt": "x"}))
    with pytest.raises(DownloadError, match="outside the raw folder"):
        unpack_zip(str(bad), str(tmp_path / "raw"))
    assert not (tmp_path / "escape.txt").exists()
    flat = tmp_path / "flat.zip"
    flat.write_bytes(_zip_bytes({"a.txt": "1", "b/c.txt": "2"}))
    assert unpack_zip(str(flat), str(tmp_path / "raw2")) == ["a.txt", os.path.join("b", "c.txt")]


def test_cli_resolves_dataset_ids_and_lists_releases(tmp_path, capsys):
    assert download.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "deezer_ttsvd" in out and "ml10m" in out and "gowalla_m1" in out
    assert download.main(["no_such_dataset", "--config", str(tmp_path)]) == 1
    assert "no_such_dataset" in capsys.readouterr().err
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")
    release, raw_dir = download._resolve("deezer_utals", config, "./data/", None)
    assert (release, raw_dir) == ("deezer_utals", "./data/deezer/raw")
    with pytest.raises(DownloadError, match="nothing to download"):
        download._resolve("ml100k_recbole", config, "./data/", None)
