"""A loopback Hugging Face Hub for tests: the HTTP API huggingface_hub 2.4 uses to publish and download.

Standard library only (``http.server`` on 127.0.0.1, a free port, one thread per request, HTTP/1.0
responses so that no kept-alive connection outlives the server). It keeps repositories in memory as
git-like commits and speaks:

- ``GET /api/whoami-v2``; ``POST /api/repos/create``; ``POST /api/validate-yaml``
- ``GET /api/models/{repo}[/revision/{rev}]`` (repo info), ``POST .../branch/{name}``
- ``POST /api/models/{repo}/preupload/{rev}``; ``POST /api/models/{repo}/commit/{rev}`` (NDJSON)
- the LFS batch API, basic transfer: ``POST /{repo}.git/info/lfs/objects/batch``, then ``PUT`` to an
  upload URL and ``POST`` to a verify URL
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``, ``POST /api/models/{repo}/paths-info/{rev}``
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: regular files directly, LFS files through a redirect to
  a "CDN" host (``localhost`` instead of ``127.0.0.1``), as the real Hub does, so the client takes the
  file metadata from the redirect response (``X-Linked-Etag``, ``X-Linked-Size``, ``Location``)
- 401 for a missing/invalid token where writing needs one, 404 with ``X-Error-Code`` for missing
  repos, revisions and files.

Usage::

    with LoopbackHub(tokens={"hf_secret": "alice"}) as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", ...}
        ...
        hub.commit_count("alice/model")
"""

from __future__ import annotations

import base64
import codecs
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

# Patterns that the Hub's default .gitattributes stores through LFS (a subset of the real list).
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.zip")
# The Hub stores files above 10 MB through LFS whatever their name.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
INITIAL_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
# A few of the license ids the Hub accepts in card metadata (it rejects others).
KNOWN_LICENSES = ("apache-2.0", "mit", "bsd-3-clause", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "gpl-3.0", "other")


def git_blob_oid(data: bytes) -> str:
    """The git SHA-1 of a blob, as the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubFile:
    """One file in a commit; ``content`` is kept for LFS files too (the LFS store is this process)."""

    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        spec = "version https://git-lfs.github.com/spec/v1"
        return f"{spec}\noid sha256:{self.sha256}\nsize {len(self.content)}\n".encode()

    @property
    def blob_oid(self) -> str:
        """git object id: of the content for regular files, of the LFS pointer for LFS files."""
        return git_blob_oid(self.pointer if self.lfs else self.content)

    @property
    def client_oid(self) -> str:
        """The oid preupload reports, compared by huggingface_hub to skip unchanged files."""
        return self.sha256 if self.lfs else git_blob_oid(self.content)


@dataclass
class HubRepo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)  # commit sha -> files
    messages: dict[str, str] = field(default_factory=dict)

    def add_commit(self, branch: str, files: dict[str, HubFile], message: str) -> str:
        parent = self.branches.get(branch, "")
        payload = json.dumps([parent, message, sorted((p, f.blob_oid) for p, f in files.items())])
        sha = hashlib.sha1(payload.encode() + str(len(self.commits)).encode()).hexdigest()
        self.commits[sha] = files
        self.messages[sha] = message
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        """Commit sha of a branch name or a (full) commit sha; None if unknown."""
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class _HubError(Exception):
    """Abort a request with an HTTP error; ``error_code`` becomes ``X-Error-Code`` as on the Hub."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None,
                 **extra):
        super().__init__(message)
        self.status, self.message, self.error_code, self.headers = status, message, error_code, headers or {}
        self.extra = extra  # more JSON fields of the error body


class LoopbackHub:
    """An in-memory Hub on ``127.0.0.1:<free port>``; a context manager that starts and stops it.

    Args:
        tokens: valid access tokens -> user name. Any other token gets a 401.
    """

    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)
        self.repos: dict[str, HubRepo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, verified
        self._pending_lfs: dict[str, bytes] = {}  # uploaded, not yet verified
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.cdn = f"http://localhost:{self.port}"  # another host name: the client treats it as a CDN
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # ----- inspection helpers for tests -----
    def commit_count(self, repo_id: str) -> int:
        """Number of commits in a repo, the initial one (``.gitattributes``) included."""
        return len(self.repos[repo_id].commits)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, HubFile]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]

    # ----- request handling -----
    def user_for(self, headers, *, required: bool) -> str | None:
        """The user behind the request's bearer token; raise 401 for a bad token, or a missing one if required."""
        auth = headers.get("Authorization")
        if auth is None:
            if required:
                raise _HubError(401, "You must be authenticated to access this resource.")
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise _HubError(401, INVALID_CREDENTIALS, headers={"X-Error-Message": INVALID_CREDENTIALS})
        return self.tokens[token]

    def repo_for(self, repo_id: str, user: str | None, *, write: bool = False) -> HubRepo:
        repo = self.repos.get(repo_id)
        owner = repo_id.split("/")[0]
        if repo is None or (repo.private and user != owner):
            raise _HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        if write and user != owner:
            raise _HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def commit_for(self, repo: HubRepo, revision: str) -> str:
        sha = repo.resolve(unquote(revision))
        if sha is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha


def _make_handler(hub: LoopbackHub):
    routes = [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>[^/]+)", "create_branch"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", "commit"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)", "paths_info"),
        ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
        ("POST", r"/lfs-verify", "lfs_verify"),
        ("GET|HEAD", r"/lfs-objects/(?P<oid>[0-9a-f]{64})", "lfs_object"),
        ("GET|HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]
    compiled = [(methods.split("|"), re.compile(pattern + r"\Z"), name) for methods, pattern, name in routes]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format, *args):  # keep pytest output clean
            pass

        def _dispatch(self):
            split = urlsplit(self.path)
            self.query = parse_qs(split.query)
            with hub._lock:
                hub.requests.append((self.command, split.path))
            for methods, pattern, name in compiled:
                match = pattern.match(split.path)
                if match and self.command in methods:
                    try:
                        body = self._read_body()
                        with hub._lock:
                            getattr(self, "do_" + name)(body, **{k: v for k, v in match.groupdict().items() if v})
                    except _HubError as err:
                        headers = dict(err.headers)
                        if err.error_code:
                            headers["X-Error-Code"] = err.error_code
                        self._send_json(err.status, {"error": err.message, **err.extra}, headers)
                    return
            self._send_json(404, {"error": f"loopback hub: no route for {self.command} {split.path}"})

        do_GET = do_POST = do_PUT = do_HEAD = _dispatch

        # ----- plumbing -----
        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes, headers: dict | None = None, content_type="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _send_json(self, status: int, obj, headers: dict | None = None):
            self._send(status, json.dumps(obj).encode(), headers)

        def _user(self, required: bool) -> str | None:
            return hub.user_for(self.headers, required=required)

        # ----- account and repos -----
        def do_whoami(self, body):
            name = self._user(required=True)
            self._send_json(200, {"type": "user", "name": name, "orgs": [],
                                  "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

        def do_create_repo(self, body):
            user = self._user(required=True)
            payload = json.loads(body)
            owner = payload.get("organization") or user
            if owner != user:
                raise _HubError(403, f"You don't have the rights to create a repo under {owner}")
            repo_id = f"{owner}/{payload['name']}"
            url = f"{hub.endpoint}/{repo_id}"
            if repo_id in hub.repos:
                raise _HubError(409, "You already created this model repo", url=url)
            repo = HubRepo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
            repo.add_commit("main", {".gitattributes": HubFile(INITIAL_GITATTRIBUTES, lfs=False)}, "initial commit")
            hub.repos[repo_id] = repo
            self._send_json(200, {"url": url, "name": repo_id})

        def do_validate_yaml(self, body):
            content = json.loads(body)["content"]
            match = re.match(r"\A---\n(.*?)\n---\n", content, re.DOTALL)
            if match is None:
                self._send_json(200, {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
                return
            try:
                metadata = yaml.safe_load(match.group(1))
            except yaml.YAMLError as err:
                raise _HubError(400, "Invalid YAML", errors=[{"message": str(err)}]) from err
            if not isinstance(metadata, dict):
                raise _HubError(400, "Invalid YAML", errors=[{"message": "metadata must be a YAML mapping"}])
            if "license" in metadata and metadata["license"] not in KNOWN_LICENSES:
                message = f"\"license\" must be one of the Hub's license ids, got {metadata['license']!r}"
                raise _HubError(400, "Invalid metadata", errors=[{"message": message}])
            self._send_json(200, {"warnings": []})

        def do_repo_info(self, body, repo, rev="main"):
            r = hub.repo_for(repo, self._user(required=False))
            sha = hub.commit_for(r, rev)
            self._send_json(200, {"id": repo, "modelId": repo, "sha": sha, "private": r.private,
                                  "siblings": [{"rfilename": p} for p in sorted(r.commits[sha])]})

        def do_create_branch(self, body, repo, branch):
            r = hub.repo_for(repo, self._user(required=True), write=True)
            branch = unquote(branch)
            if branch in r.branches:
                raise _HubError(409, f"Reference refs/heads/{branch} already exists")
            start = (json.loads(body).get("startingPoint") if body else None) or "main"
            r.branches[branch] = hub.commit_for(r, start)
            self._send_json(200, {})

        # ----- upload -----
        def do_preupload(self, body, repo, rev):
            r = hub.repo_for(repo, self._user(required=True), write=True)
            files = r.commits[hub.commit_for(r, rev)]
            result = []
            for entry in json.loads(body)["files"]:
                sample = base64.b64decode(entry["sample"])
                lfs = _stored_as_lfs(entry["path"], sample, entry["size"])
                remote = files.get(entry["path"])
                result.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular",
                               "shouldIgnore": False, "oid": remote.client_oid if remote else None})
            self._send_json(200, {"files": result, "commitOid": r.resolve(unquote(rev))})

        def do_lfs_batch(self, body, repo):
            hub.repo_for(repo, self._user(required=True), write=True)
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in hub.lfs_objects:  # known objects need no transfer
                    entry["actions"] = {
                        "upload": {"href": f"{hub.cdn}/lfs-upload/{obj['oid']}"},
                        "verify": {"href": f"{hub.endpoint}/lfs-verify"},
                    }
                objects.append(entry)
            self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                       content_type="application/vnd.git-lfs+json")

        def do_lfs_upload(self, body, oid):
            # The "storage" URL is pre-signed: no Authorization expected, like S3.
            hub._pending_lfs[oid] = body
            self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

        def do_lfs_verify(self, body):
            self._user(required=True)
            obj = json.loads(body)
            data = hub._pending_lfs.pop(obj["oid"], None)
            if data is None or hashlib.sha256(data).hexdigest() != obj["oid"] or len(data) != obj["size"]:
                raise _HubError(422, f"LFS object {obj['oid']} was not uploaded or does not match its oid/size")
            hub.lfs_objects[obj["oid"]] = data
            self._send_json(200, {"success": True})

        def do_commit(self, body, repo, rev):
            r = hub.repo_for(repo, self._user(required=True), write=True)
            branch = unquote(rev)
            if branch not in r.branches:
                raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            files = dict(r.commits[r.branches[branch]])
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
            parent = header.get("parentCommit")
            if parent is not None and not r.branches[branch].startswith(parent):
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = HubFile(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    if value["oid"] not in hub.lfs_objects:
                        raise _HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    files[value["path"]] = HubFile(hub.lfs_objects[value["oid"]], lfs=True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise _HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
                else:
                    raise _HubError(400, f"Unknown commit operation {key!r}")
            sha = r.add_commit(branch, files, header.get("summary", ""))
            self._send_json(200, {"success": True, "commitOid": sha,
                                  "commitUrl": f"{hub.endpoint}/{repo}/commit/{sha}"})

        # ----- listings -----
        def _entry(self, path: str, f: HubFile) -> dict:
            entry = {"type": "file", "oid": f.blob_oid, "size": len(f.content), "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.content), "pointerSize": len(f.pointer)}
            return entry

        def _listing(self, files: dict[str, HubFile], prefix: str, recursive: bool) -> list[dict]:
            prefix = prefix.strip("/")
            entries, folders = [], set()
            for path in sorted(files):
                if prefix and not path.startswith(prefix + "/"):
                    continue
                rest = path[len(prefix) + 1:] if prefix else path
                if "/" in rest and not recursive:
                    folders.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                else:
                    entries.append(self._entry(path, files[path]))
            return [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(folders)] + entries

        def do_tree(self, body, repo, rev, path=""):
            r = hub.repo_for(repo, self._user(required=False))
            files = r.commits[hub.commit_for(r, rev)]
            recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
            listing = self._listing(files, unquote(path), recursive)
            if path and not listing:
                raise _HubError(404, f"Path {path} not found", "EntryNotFound")
            self._send_json(200, listing)

        def do_paths_info(self, body, repo, rev):
            r = hub.repo_for(repo, self._user(required=False))
            files = r.commits[hub.commit_for(r, rev)]
            form = parse_qs(body.decode())
            self._send_json(200, [self._entry(p, files[p]) for p in form.get("paths", []) if p in files])

        # ----- download -----
        def do_resolve(self, body, repo, rev, path):
            r = hub.repo_for(repo, self._user(required=False))
            sha = hub.commit_for(r, rev)
            path = unquote(path)
            commit_header = {"X-Repo-Commit": sha}
            f = r.commits[sha].get(path)
            if f is None:
                raise _HubError(404, f"Entry {path} not found", "EntryNotFound", commit_header)
            if f.lfs:
                # Like the Hub: LFS files redirect to storage on another host, and the redirect
                # response itself carries the file's metadata.
                self._send(302, b"", {**commit_header, "ETag": f'"{f.blob_oid}"',
                                      "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.content)),
                                      "Location": f"{hub.cdn}/lfs-objects/{f.sha256}?repo={quote(repo)}"})
                return
            self._send(200, f.content, {**commit_header, "ETag": f'"{f.blob_oid}"'},
                       content_type="application/octet-stream")

        def do_lfs_object(self, body, oid):
            if "Authorization" in self.headers:  # the client must not leak its token to storage
                raise _HubError(400, "Authorization header sent to the storage host")
            data = hub.lfs_objects.get(oid)
            if data is None:
                raise _HubError(404, f"LFS object {oid} not found")
            self._send(200, data, {"ETag": f'"{oid}"'}, content_type="application/octet-stream")

    return Handler


def _stored_as_lfs(path: str, sample: bytes, size: int) -> bool:
    """The Hub's rule: LFS if the name matches .gitattributes, the file is large, or it looks binary."""
    if any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern) for pattern in LFS_PATTERNS):
        return True
    if size > LFS_SIZE_THRESHOLD:
        return True
    try:
        # Incremental: a multi-byte character cut at the end of the 512-byte sample is not "binary".
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        return True
    return b"\0" in sample
