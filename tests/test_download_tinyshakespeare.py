"""scripts/download_tinyshakespeare.py: the corpus from a (loopback) server, checked; one line offline."""

import functools
import http.server
import socket
import threading

import download_tinyshakespeare as download
import pytest


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server for the files in `tmp_path / "site"`; yields its base URL."""
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", site
    httpd.shutdown()


def test_downloads_and_checks_the_corpus(tmp_path, server, capsys, tinyshakespeare):
    base, site = server
    (site / "input.txt").write_bytes(tinyshakespeare.read_bytes())
    out = tmp_path / "data" / "tinyshakespeare.txt"
    download.main(["--out", str(out), "--url", f"{base}/input.txt"])
    assert out.read_bytes() == tinyshakespeare.read_bytes()
    assert capsys.readouterr().out == f"{out}: tinyshakespeare, 1,115,394 characters\n"
    (site / "input.txt").unlink()  # already there and intact: no download
    assert download.download(out, f"{base}/input.txt") == out


def test_wrong_content_is_refused(tmp_path, server):
    base, site = server
    (site / "input.txt").write_text("First Citizen:\n")
    out = tmp_path / "corpus.txt"
    with pytest.raises(SystemExit, match=r"^error: .*input.txt gave 15 bytes that are not tinyshakespeare .*written"):
        download.download(out, f"{base}/input.txt")
    assert not out.exists()


def test_offline_is_one_line(tmp_path):
    with socket.socket() as closed:  # a port nobody listens on: refused at once, as offline
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(SystemExit, match=r"^error: could not download http://127.0.0.1:\d+/input.txt \(.*refused.*\); "
                                         r"fetch it with a browser or curl"):
        download.download(tmp_path / "corpus.txt", f"http://127.0.0.1:{port}/input.txt", timeout=5)
