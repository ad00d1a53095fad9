"""A stand-in for the Hugging Face Hub's file endpoints, on 127.0.0.1, for download tests.

Serves what the real ``huggingface_hub`` client asks for (``HEAD``/``GET``
``/{repo}/resolve/{revision}/{file}`` with ``X-Repo-Commit``, ``ETag``, ``Content-Length``,
``Range`` resumes; the Hub's ``X-Error-Code`` answers for a missing repo or file, a private or
gated repo; ``/api/models/{repo}/tree|revision/{rev}`` listings), and can misbehave: hang
without answering, or break a transfer off half-way. Binds 127.0.0.1 only, on a free port;
``stop()`` (or leaving the ``with`` block) ends it, and a hanging handler gives up by
itself after ``hang_s`` seconds, so nothing outlives a test.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FakeHub:
    """Repos of files in memory, served the way the Hub serves them.

    Attributes:
        requests: ``(method, path)`` of every request received, in order.
        hang: when True, every request is read and never answered (until ``stop``).
        break_off: filename -> how many more GETs of it stop half-way (connection closed).
        stall: filename -> how many more GETs of it send half the file, then nothing.
        fail_resume: when True, a GET with a ``Range`` header is answered with HTTP 500.
        token: the bearer token that opens private and gated repos.
    """

    def __init__(self, hang_s: float = 30.0):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.access: dict[str, str] = {}  # repo -> "public" | "private" | "gated"
        self.requests: list[tuple[str, str]] = []
        self.hang = False
        self.break_off: dict[str, int] = {}
        self.stall: dict[str, int] = {}
        self.fail_resume = False
        self.token = "hf_test_token"
        self.hang_s = hang_s
        self._stopped = threading.Event()
        self._server = None
        self._thread = None

    # -- content --------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict, access: str = "public") -> None:
        self.repos[repo_id] = {name: bytes(data) for name, data in files.items()}
        self.access[repo_id] = access

    def add_folder(self, repo_id: str, folder, access: str = "public") -> None:
        folder = Path(folder)
        self.add_repo(repo_id, {str(p.relative_to(folder)): p.read_bytes()
                                for p in sorted(folder.rglob("*")) if p.is_file()}, access)

    def commit(self, repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()  # 40 hex digits, stable per repo

    # -- life cycle -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs=dict(poll_interval=0.05),
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port (later connections are refused)."""
        self._stopped.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    # -----------------------------------------------------------------------------------
    def _send(self, code: int, headers: dict, payload: bytes = b"", body: bool = True) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body and payload:
            self.wfile.write(payload)

    def _error(self, code: int, error_code: str, message: str, commit: str = "", body: bool = True) -> None:
        headers = {"X-Error-Code": error_code, "X-Error-Message": message, "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(code, headers, json.dumps({"error": message}).encode(), body)

    def _answer(self, body: bool) -> None:
        fake = self.fake
        path = unquote(urlsplit(self.path).path)
        fake.requests.append((self.command, path))
        if fake.hang:  # accept, read the request, never answer
            fake._stopped.wait(fake.hang_s)
            self.close_connection = True
            return
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("tree", "revision"):
            return self._api(f"{parts[2]}/{parts[3]}", parts[4], body)
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "NotFound", "not a Hub file URL", body=body)
        repo_id, filename = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
        files = fake.repos.get(repo_id)
        if files is None:
            return self._error(404, "RepoNotFound", "Repository not found", body=body)
        if not self._allowed(repo_id, body):
            return
        commit = fake.commit(repo_id)
        data = files.get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", commit, body)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start = 0
        rng = self.headers.get("Range")
        if body and rng:
            if fake.fail_resume:
                return self._error(500, "InternalError", "resume refused by the test", body=body)
            start = int(rng.split("=")[1].split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        stall = body and fake.stall.get(filename, 0) > 0
        if stall or (body and fake.break_off.get(filename, 0) > 0):
            if stall:
                fake.stall[filename] -= 1
            else:
                fake.break_off[filename] -= 1
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            if stall:  # half sent, then silence (the client is killed meanwhile)
                fake._stopped.wait(fake.hang_s)
            self.close_connection = True
            return
        self._send(206 if start else 200, headers, data[start:], body)

    def _allowed(self, repo_id: str, body: bool) -> bool:
        fake = self.fake
        access = fake.access.get(repo_id, "public")
        if access == "public" or self.headers.get("Authorization") == f"Bearer {fake.token}":
            return True
        if access == "gated":
            self._error(401, "GatedRepo", "Access to this model is restricted", body=body)
        else:  # the Hub answers a private repo like a missing one, with 401
            self._error(401, "RepoNotFound", "Repository not found", body=body)
        return False

    def _api(self, repo_id: str, what: str, body: bool) -> None:
        fake = self.fake
        files = fake.repos.get(repo_id)
        if files is None:
            return self._error(404, "RepoNotFound", "Repository not found", body=body)
        if not self._allowed(repo_id, body):
            return
        if what == "tree":
            payload = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                       for n, d in sorted(files.items())]
        else:
            payload = {"id": repo_id, "modelId": repo_id, "sha": fake.commit(repo_id), "tags": [],
                       "siblings": [{"rfilename": n} for n in sorted(files)], "private": False}
        self._send(200, {"Content-Type": "application/json"}, json.dumps(payload).encode(), body)


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connections are refused at once)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


__all__ = ["FakeHub", "closed_port_url"]
