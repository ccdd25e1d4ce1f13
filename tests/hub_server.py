"""A small in-process stand-in for the Hugging Face hub, for tests without network.

:class:`FakeHub` serves, on ``127.0.0.1`` at a random port, the parts of the hub
API that ``huggingface_hub`` calls when surgeon resolves, downloads and pushes
models:

- ``GET /api/models/{repo}[/revision/{rev}]``     model info (``sha`` resolves a branch/tag)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``   file listing (``snapshot_download``)
- ``HEAD|GET /{repo}/resolve/{rev}/{file}``        file metadata / download, with the
  headers ``huggingface_hub`` expects (``X-Repo-Commit``, ``ETag``, ``Content-Length``)
  and ``Range`` support (safetensors headers are read with range requests)
- ``POST /api/repos/create``                       repo creation (409 when it exists)
- ``POST /api/models/{repo}/branch/{branch}``      branch creation
- ``POST /api/models/{repo}/preupload/{rev}``      answers ``uploadMode: regular`` for every file
- ``POST /api/models/{repo}/commit/{rev}``         NDJSON commit with base64 inline files
- ``POST /api/validate-yaml``                      model card front matter check (always fine)
- ``GET /api/whoami-v2``

It keeps whole git-like histories in memory (commit sha -> {path: bytes}), checks
the bearer token on writes (and on reads of private repos), and counts what it
serves: :attr:`FakeHub.served` lists every body sent, and
:meth:`FakeHub.weight_bytes_served` counts the bytes of ``.safetensors`` files sent
beyond each file's header, i.e. actual tensor data.

Nothing here imports ``huggingface_hub``; :func:`point_hf_at` redirects an
already-imported ``huggingface_hub`` to a FakeHub (and a temporary HF_HOME).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

REPO = r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)"


_BLOB_SHAS: dict[int, tuple[bytes, str]] = {}  # id -> (the bytes, kept alive; their sha)


def git_blob_sha(data: bytes) -> str:
    """Git's blob id of ``data``; remembered for large files (every range request of a shard
    answers with it as ETag: hashing a 0.5 GB shard per request made the fake hub the bottleneck)."""
    hit = _BLOB_SHAS.get(id(data))
    if hit is not None and hit[0] is data:
        return hit[1]
    sha = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    if len(data) >= 1 << 20:
        _BLOB_SHAS[id(data)] = (data, sha)
    return sha


@dataclass
class Served:
    method: str
    repo: str
    revision: str
    path: str
    start: int
    end: int  # exclusive
    header_end: int | None  # for .safetensors: 8 + header length

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def weight_bytes(self) -> int:
        if self.header_end is None:
            return 0
        return max(0, self.end - max(self.start, self.header_end))


@dataclass
class Repo:
    id: str
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    parents: dict[str, str | None] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in self.commits:
            return rev
        return None


class FakeHub:
    """An in-memory hub; ``with FakeHub(token=...) as hub: hub.url``."""

    def __init__(self, token: str | None = None, echo_token_in_errors: bool = True):
        self.token = token
        # Real servers sometimes quote what they were sent; echoing the bad token in
        # 401 bodies lets tests check that surgeon scrubs it from its messages.
        self.echo_token_in_errors = echo_token_in_errors
        self.repos: dict[str, Repo] = {}
        self.served: list[Served] = []
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.auth_seen: list[str] = []
        self.commit_payloads: list[list[dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._counter = 0
        # fault injection for weight bytes (GETs of .safetensors ranges past the header):
        self.drop_weight_gets = 0  # the next N send half their body, then close the connection
        self.fail_weight_gets = 0  # the next N answer 503
        self.weight_delay_s = 0.0  # every one waits this long before answering
        # every one sends its body at most this fast (0: no cap), like a CDN's per-connection limit
        self.weight_bytes_per_s = 0.0
        self.faults_injected = 0
        self.in_flight = 0  # requests being answered now
        self.max_in_flight = 0  # the most answered at once since reset_counters
        self._last_request = 0.0  # time.monotonic() when the latest request arrived
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content ----------------------------------------------------------------
    def add_commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", message: str = "commit",
                   replace: bool = False, private: bool = False) -> str:
        """Commit ``files`` on top of ``branch`` (or replace the whole tree); returns the sha."""
        with self._lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                repo = self.repos[repo_id] = Repo(repo_id, private=private)
            parent = repo.branches.get(branch)
            tree = {} if (replace or parent is None) else dict(repo.commits[parent])
            tree.update(files)
            self._counter += 1
            sha = hashlib.sha1(json.dumps([repo_id, branch, parent, message, self._counter,
                                           sorted((p, git_blob_sha(b)) for p, b in tree.items())]).encode()).hexdigest()
            repo.commits[sha] = tree
            repo.parents[sha] = parent
            repo.messages[sha] = message
            repo.branches[branch] = sha
            return sha

    def add_folder(self, repo_id: str, folder: Path, **kw: Any) -> str:
        files = {str(p.relative_to(folder)).replace("\\", "/"): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.add_commit(repo_id, files, **kw)

    def tag(self, repo_id: str, name: str, sha: str) -> None:
        self.repos[repo_id].tags[name] = sha

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        sha = repo.resolve(rev)
        assert sha is not None, f"{repo_id}@{rev}"
        return repo.commits[sha]

    # -- accounting -------------------------------------------------------------
    def weight_bytes_served(self, repo_id: str | None = None) -> int:
        return sum(s.weight_bytes for s in self.served if s.method == "GET" and (repo_id is None or s.repo == repo_id))

    def files_downloaded(self, repo_id: str | None = None) -> set[str]:
        """Files sent whole (not a header range) by GET."""
        out = set()
        for s in self.served:
            if s.method == "GET" and (repo_id is None or s.repo == repo_id) and s.start == 0:
                size = len(self.repos[s.repo].commits[s.revision][s.path])
                if s.end == size:
                    out.add(s.path)
        return out

    def wait_idle(self, quiet_s: float = 0.2, timeout_s: float = 30.0) -> None:
        """Return once no request is being answered and none arrived for ``quiet_s``.

        A client killed mid-request leaves its handler running (``weight_delay_s``
        sleeps, then the body goes to a dead socket): its bytes are appended to
        :attr:`served` when it finishes. Call this before :meth:`reset_counters`
        so that they are not counted as the next client's."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                idle = self.in_flight == 0 and time.monotonic() - self._last_request >= quiet_s
            if idle:
                return
            time.sleep(0.01)
        raise TimeoutError(f"the fake hub still answers {self.in_flight} request(s) after {timeout_s} s")

    def reset_counters(self) -> None:
        with self._lock:
            self.served.clear()
            self.requests.clear()
            self.unhandled.clear()
            self.max_in_flight = self.in_flight

    # -- server -----------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing ---------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", head: bool = False, bytes_per_s: float = 0.0) -> None:
        """Answer with ``body``; ``bytes_per_s`` > 0 paces it (256 KiB at a time) to at most that rate."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if head or not body:
            return
        if bytes_per_s <= 0:
            self.wfile.write(body)
            return
        view, t0, step = memoryview(body), time.monotonic(), 256 << 10
        for at in range(0, len(body), step):
            self.wfile.write(view[at:at + step])
            ahead = t0 + min(len(body), at + step) / bytes_per_s - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), headers, head=head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head=head)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:] if auth.startswith("Bearer ") else None

    def _authorized(self) -> bool:
        tok = self._token()
        if tok:
            self.hub.auth_seen.append(tok)
        return self.hub.token is None or tok == self.hub.token

    def _unauthorized(self, head: bool = False) -> None:
        tok = self._token()
        msg = "Invalid credentials in Authorization header"
        if tok and self.hub.echo_token_in_errors:
            msg += f" (token {tok!r} is not valid)"
        self._error(401, None, msg, head=head)

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(404 if repo is None else 401, "RepoNotFound", f"Repository not found: {repo_id}", head=head)
            return None
        return repo

    # -- routing ----------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        with self.hub._lock:
            self.hub.in_flight += 1
            self.hub.max_in_flight = max(self.hub.max_in_flight, self.hub.in_flight)
            self.hub._last_request = time.monotonic()
        try:
            self._answer(method)
        finally:
            with self.hub._lock:
                self.hub.in_flight -= 1

    def _answer(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        with self.hub._lock:
            self.hub.requests.append((method, self.path))
        routes = [
            ("GET", rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)", self.model_info),
            ("GET", rf"/api/models/{REPO}", self.model_info),
            ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self.tree),
            ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
            ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", self.create_branch),
            ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", self.preupload),
            ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", self.commit),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("GET", r"/api/whoami-v2", self.whoami),
        ]
        for m, pattern, fn in routes:
            if m == method:
                match = re.fullmatch(pattern, path)
                if match:
                    kwargs = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    try:
                        fn(query=query, head=method == "HEAD", **kwargs)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
        self.hub.unhandled.append((method, self.path))
        self._error(404, None, f"fake hub: no route for {method} {path}", head=method == "HEAD")

    # -- reads ------------------------------------------------------------------
    def model_info(self, repo: str, query: dict, head: bool, rev: str = "main") -> None:
        r = self._repo(repo)
        if r is None:
            return
        sha = r.resolve(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = r.commits[sha]
        self._json(200, {
            "_id": hashlib.md5(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo, "sha": sha,
            "private": r.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p} for p in sorted(files)],
        })

    def tree(self, repo: str, rev: str, query: dict, head: bool, sub: str | None = None) -> None:
        r = self._repo(repo)
        if r is None:
            return
        sha = r.resolve(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        prefix = (sub.strip("/") + "/") if sub else ""
        entries, folders = [], set()
        for p, data in sorted(r.commits[sha].items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                for i in range(len(parts)):
                    folders.add(prefix + "/".join(parts[: i + 1]))
            entries.append({"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": p})
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        self._json(200, entries)

    def resolve(self, repo: str, rev: str, file: str, query: dict, head: bool) -> None:
        r = self._repo(repo, head=head)
        if r is None:
            return
        sha = r.resolve(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
        data = r.commits[sha].get(file)
        if data is None:
            headers = {"X-Repo-Commit": sha, "X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}
            return self._send(404, b'{"error":"Entry not found"}', headers, head=head)
        etag = f'"{git_blob_sha(data)}"'
        headers = {"X-Repo-Commit": sha, "ETag": etag, "Accept-Ranges": "bytes"}
        start, end, status = 0, len(data), 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m:
                return self._error(416, None, f"bad range {rng}", head=head)
            a, b = m.group(1), m.group(2)
            if a == "":
                start, end = max(0, len(data) - int(b)), len(data)
            else:
                start, end = int(a), (min(int(b) + 1, len(data)) if b else len(data))
            if start >= len(data) and len(data) > 0:
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head=head)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        body = data[start:end]
        header_end = None
        if file.endswith(".safetensors") and len(data) >= 8:
            header_end = 8 + int.from_bytes(data[:8], "little")
        weights = not head and header_end is not None and end > header_end
        fault = None
        if weights:
            if self.hub.weight_delay_s:
                time.sleep(self.hub.weight_delay_s)
            with self.hub._lock:
                if self.hub.fail_weight_gets > 0:
                    self.hub.fail_weight_gets -= 1
                    fault = "fail"
                elif self.hub.drop_weight_gets > 0 and len(body) > 1:
                    self.hub.drop_weight_gets -= 1
                    fault = "drop"
                if fault:
                    self.hub.faults_injected += 1
        if fault == "fail":
            return self._error(503, None, "injected: service unavailable")
        if fault == "drop":  # promise the whole body, send half, hang up
            half = len(body) // 2
            with self.hub._lock:
                self.hub.served.append(Served("GET", repo, sha, file, start, start + half, header_end))
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[:half])
            self.wfile.flush()
            self.close_connection = True
            return
        if not head:
            with self.hub._lock:
                self.hub.served.append(Served("GET", repo, sha, file, start, end, header_end))
        self._send(status, body, headers, content_type="application/octet-stream", head=head,
                   bytes_per_s=self.hub.weight_bytes_per_s if weights else 0.0)

    def whoami(self, query: dict, head: bool) -> None:
        if not self._token() or not self._authorized():
            return self._unauthorized()
        self._json(200, {"type": "user", "name": "tester", "orgs": [{"name": "org"}], "auth": {"type": "access_token"}})

    def validate_yaml(self, query: dict, head: bool) -> None:
        self._body()
        self._json(200, {"errors": [], "warnings": []})

    # -- writes -----------------------------------------------------------------
    def create_repo(self, query: dict, head: bool) -> None:
        payload = json.loads(self._body() or b"{}")
        if not self._authorized() or not self._token():
            return self._unauthorized()
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        private = payload.get("private") or payload.get("visibility") == "private"
        with self.hub._lock:
            repo = self.hub.repos[repo_id] = Repo(repo_id, private=bool(private))
        # a new repo has one commit with a .gitattributes, like the real hub
        self.hub.add_commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                            message="initial commit")
        assert self.hub.repos[repo_id] is repo
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def create_branch(self, repo: str, branch: str, query: dict, head: bool) -> None:
        payload = json.loads(self._body() or b"{}")
        if not self._authorized() or not self._token():
            return self._unauthorized()
        r = self._repo(repo)
        if r is None:
            return
        if branch in r.branches:
            return self._error(409, None, f"Reference already exists: refs/heads/{branch}")
        start = r.resolve(payload.get("startingPoint") or "main")
        if start is None:
            return self._error(404, "RevisionNotFound", "Invalid starting point")
        r.branches[branch] = start
        self._json(200, {})

    def preupload(self, repo: str, rev: str, query: dict, head: bool) -> None:
        payload = json.loads(self._body() or b"{}")
        if not self._authorized() or not self._token():
            return self._unauthorized()
        r = self._repo(repo)
        if r is None:
            return
        sha = r.resolve(rev)
        existing = r.commits.get(sha, {}) if sha else {}
        files = []
        for f in payload.get("files", []):
            old = existing.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_sha(old) if old is not None else None})
        self._json(200, {"files": files, "commitOid": sha})

    def commit(self, repo: str, rev: str, query: dict, head: bool) -> None:
        raw = self._body()
        if not self._authorized() or not self._token():
            return self._unauthorized()
        r = self._repo(repo)
        if r is None:
            return
        if rev not in r.branches:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        self.hub.commit_payloads.append(lines)
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        changes: dict[str, bytes] = {}
        deleted: list[str] = []
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, None, f"unsupported encoding {value.get('encoding')}")
                changes[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            elif key in ("lfsFile", "deletedFolder"):
                return self._error(400, None, f"fake hub: {key} is not supported")
        parent = r.branches[rev]
        if header.get("parentCommit") and header["parentCommit"] != parent:
            return self._error(412, None, "parent commit is not the head of the branch")
        tree = dict(r.commits[parent])
        for p in deleted:
            tree.pop(p, None)
        sha = self.hub.add_commit(repo, {}, branch=rev, message=header.get("summary", ""))
        tree.update(changes)
        r.commits[sha] = tree
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{repo}/commit/{sha}",
                         "pullRequestUrl": None})


def point_hf_at(monkeypatch: Any, url: str, home: Path, *, token: str | None = None, offline: bool = False) -> dict[str, str]:
    """Point ``huggingface_hub`` (environment and already-imported constants) at ``url``.

    Returns the environment variables set, for subprocesses.
    """
    import huggingface_hub.constants as C

    home = Path(home)
    env = {
        "HF_ENDPOINT": url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
        env["HF_TOKEN"] = token
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(C, "ENDPOINT", url)
    monkeypatch.setattr(C, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(C, "HF_HOME", str(home))
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(C, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(C, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(C, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    return env


# -- tiny models -----------------------------------------------------------------
def build_tiny_model(folder: Path, seed: int, *, hidden: int = 32, vocab: int = 256, layers: int = 2,
                     shards: int = 1, tokenizer: bool = True, extras: bool = True) -> Path:
    """A tiny Llama-shaped checkpoint (random float32 weights) with config, tokenizer and junk files.

    ``shards > 1`` writes ``model-0000i-of-0000n.safetensors`` plus an index. ``extras`` adds
    files a hub repo often carries but surgeon must not download: ``README.md``,
    ``pytorch_model.bin`` (a pickle), ``training_args.bin`` and ``optimizer.pt``.
    """
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    inter = hidden * 2
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.1}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = torch.randn(hidden, hidden, generator=g) * 0.1
        sd[p + "mlp.gate_proj.weight"] = torch.randn(inter, hidden, generator=g) * 0.1
        sd[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden, generator=g) * 0.1
        sd[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=g) * 0.1
        sd[p + "input_layernorm.weight"] = torch.ones(hidden)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    sd["model.norm.weight"] = torch.ones(hidden)
    sd["lm_head.weight"] = torch.randn(vocab, hidden, generator=g) * 0.1
    names = sorted(sd)
    if shards <= 1:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for k in range(shards):
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = names[k * per:(k + 1) * per]
            save_file({n: sd[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_attention_heads": 4, "num_key_value_heads": 4,
        "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab_map = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
        tok = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "model_max_length": 128}))
    if extras:
        (folder / "README.md").write_text(f"# tiny model {seed}\n")
        torch.save({k: v for k, v in list(sd.items())[:2]}, folder / "pytorch_model.bin")
        (folder / "training_args.bin").write_bytes(b"\x80\x04junk" * 64)
        (folder / "optimizer.pt").write_bytes(b"\0" * 50_000)
    return folder
