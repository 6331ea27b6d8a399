"""A Hugging Face Hub look-alike for tests: the HTTP API that the installed ``huggingface_hub`` really
calls, served on 127.0.0.1 by the standard library, with repos, commits and refs kept in memory.

What the client calls, and what answers it here:

- ``POST /api/repos/create`` (``create_repo``; 409 when it exists, which ``exist_ok`` accepts). A new
  repo gets an initial commit holding ``.gitattributes``, as on the Hub.
- ``POST /api/validate-yaml`` (before a ``README.md`` is uploaded: its front matter must be a mapping).
- ``POST /api/models/{repo}/preupload/{rev}``: for each file, ``regular`` (inline, base64 in the commit)
  or ``lfs`` (large, binary, or an LFS suffix such as ``.safetensors``), with the remote oid so the
  client skips unchanged files.
- ``POST /{repo}.git/info/lfs/objects/batch`` (LFS batch API, ``basic`` transfer): an ``upload`` href
  on a second listener (the "storage", another origin like S3) and a ``verify`` href on the Hub.
  ``PUT`` stores the object after checking its sha256 and size; ``verify`` checks it is there.
- ``POST /api/models/{repo}/commit/{rev}``: the NDJSON commit (``header``, ``file`` with base64
  content, ``lfsFile`` by sha256, ``deletedFile``, ``deletedFolder``); ``parentCommit`` is honoured.
  Every commit gets a 40-hex id and moves the branch.
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: regular files answer 200 with ``ETag`` (git blob
  sha1), ``X-Repo-Commit`` and ``Content-Length``; LFS files answer 302 to a signed URL on the
  storage origin with ``X-Linked-Etag`` (sha256), ``X-Linked-Size`` and ``X-Repo-Commit``. The client
  does not follow a redirect to another origin and drops the token for it, as with the real CDN.
- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (``model_info``/``repo_info``),
  ``/api/models/{repo}/refs``, ``/api/models/{repo}/tree/{rev}[/{path}]`` (``list_repo_files``),
  ``GET /api/whoami-v2``, ``GET /api/agent-harnesses`` (fetched for the User-Agent header).

Errors carry the headers ``hf_raise_for_status`` maps to exception types: ``X-Error-Code``
``RepoNotFound`` (401 without a token, 404 with one that has no access: a private repo looks like a
missing one), ``RevisionNotFound``, ``EntryNotFound``; a token the server does not know gets 401
``Invalid credentials in Authorization header``. ``HubServer.fail`` injects failures (e.g. a 500 on
``/commit/``); every request is logged in ``requests`` and anything unrouted in ``unhandled``.

Xet: with ``hf_xet`` installed, huggingface_hub 2.x sends every ``lfs``-mode file through Xet storage
(``upload_folder`` -> ``_upload_pipeline.pipelined_upload``, ``create_commit`` ->
``_commit_api._upload_xet_files``) without asking the server: ``_upload_files`` only checks
``is_xet_available()``. The one switch back to the plain LFS batch API is ``HF_HUB_DISABLE_XET=1``
(``constants.HF_HUB_DISABLE_XET``), which ``hub_client`` sets. Downloads use Xet only when a
``resolve`` answer carries ``X-Xet-Hash``, which this server never sends.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

TOKEN = "hf_test_write_token"
LFS_MIN_SIZE = 10 * 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack", ".npz", ".zip",
                ".tar", ".gz", ".png", ".jpg", ".jpeg", ".pkl", ".pickle")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_DATASET = r"(?P<dataset>[\w.-]+/[\w.-]+)"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: sha1 of ``blob <size>\\0`` + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


@dataclass
class StoredFile:
    size: int
    blob_oid: str  # git oid of the content (regular) or of the LFS pointer
    content: bytes | None = None  # regular files
    lfs_sha256: str | None = None  # LFS files: the content lives in HubState.lfs_objects

    @classmethod
    def plain(cls, data: bytes) -> "StoredFile":
        return cls(len(data), git_blob_oid(data), data)

    @classmethod
    def lfs(cls, sha256: str, size: int) -> "StoredFile":
        return cls(size, git_blob_oid(lfs_pointer(sha256, size)), lfs_sha256=sha256)


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, StoredFile]
    title: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=_now)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


@dataclass
class Failure:
    method: str
    pattern: str
    status: int
    times: int | None
    message: str


class HubServer:
    """The Hub (``url``) and its LFS storage (``storage_url``, another origin), sharing one state."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.tokens: dict[str, tuple[str, set[str] | None]] = {TOKEN: ("tester", None)}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.failures: list[Failure] = []
        self.lock = threading.RLock()
        self._secret = os.urandom(16)
        self._counter = 0
        self._servers: list[ThreadingHTTPServer] = []
        self.url = self.storage_url = ""

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> "HubServer":
        for role in ("hub", "storage"):
            handler = type(f"{role.title()}Handler", (_Handler,), {"hub": self, "role": role})
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers.append(server)
        self.url, self.storage_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    # -- helpers for tests ----------------------------------------------------------------------
    def add_token(self, token: str, user: str = "someone-else", namespaces: set[str] | None = None) -> None:
        """A valid token for ``user``, with access to the repos of ``namespaces`` (None: all)."""
        self.tokens[token] = (user, namespaces)

    def fail(self, method: str, pattern: str, status: int = 500, times: int | None = 1,
             message: str = "Internal Error - We're working hard to fix this as soon as possible!") -> None:
        """Answer the next ``times`` (None: all) ``method`` requests whose path matches ``pattern``."""
        self.failures.append(Failure(method.upper(), pattern, status, times, message))

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path → content of every file of ``repo_id`` at ``revision``."""
        with self.lock:
            repo = self.repos[repo_id]
            commit = repo.commits[repo.branches.get(revision, revision)]
            return {path: f.content if f.content is not None else self.lfs_objects[f.lfs_sha256]
                    for path, f in commit.files.items()}

    def add_dataset(self, repo_id: str, files: dict[str, bytes], lfs_suffixes: tuple[str, ...] = (".parquet",)) -> str:
        """A public dataset repo ``repo_id`` with one commit adding ``files`` (path → content; those with
        ``lfs_suffixes`` stored as LFS objects, as the Hub stores parquet); returns the commit id."""
        with self.lock:
            repo = self.repos.get(f"datasets/{repo_id}") or self.create_repo(f"datasets/{repo_id}")
            stored = dict(repo.commits[repo.branches["main"]].files)
            for path, data in files.items():
                if path.endswith(lfs_suffixes):
                    oid = hashlib.sha256(data).hexdigest()
                    self.lfs_objects[oid] = data
                    stored[path] = StoredFile.lfs(oid, len(data))
                else:
                    stored[path] = StoredFile.plain(data)
            return self._commit(repo, "main", stored, f"add {len(files)} file(s)").oid

    def lfs_paths(self, repo_id: str, revision: str = "main") -> set[str]:
        repo = self.repos[repo_id]
        commit = repo.commits[repo.branches.get(revision, revision)]
        return {path for path, f in commit.files.items() if f.lfs_sha256 is not None}

    def history(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """Commits from the branch head back to the initial one."""
        repo, commits = self.repos[repo_id], []
        oid = repo.branches[branch]
        while oid is not None:
            commits.append(repo.commits[oid])
            oid = repo.commits[oid].parent
        return commits

    # -- state changes --------------------------------------------------------------------------
    def _new_oid(self, *parts: str) -> str:
        self._counter += 1
        return hashlib.sha1("\0".join((*parts, str(self._counter), _now())).encode()).hexdigest()

    def _commit(self, repo: Repo, branch: str, files: dict[str, StoredFile], title: str) -> Commit:
        parent = repo.branches.get(branch)
        commit = Commit(self._new_oid(repo.repo_id, parent or "", title), parent, files, title, _now())
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        with self.lock:
            repo = self.repos[repo_id] = Repo(repo_id, private)
            self._commit(repo, "main", {".gitattributes": StoredFile.plain(GITATTRIBUTES)}, "initial commit")
            return repo

    def sign(self, oid: str) -> str:
        return hmac.new(self._secret, oid.encode(), hashlib.sha256).hexdigest()[:32]


def _file_entry(path: str, stored: StoredFile) -> dict:
    """A file's entry in ``tree``/``paths-info`` answers (with ``lfs`` for LFS files)."""
    entry = {"type": "file", "oid": stored.blob_oid, "size": stored.size, "path": path}
    if stored.lfs_sha256:
        entry["lfs"] = {"oid": stored.lfs_sha256, "size": stored.size,
                        "pointerSize": len(lfs_pointer(stored.lfs_sha256, stored.size))}
    return entry


def _dir_entry(path: str) -> dict:
    return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer
    role: str

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- plumbing -------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _handle(self) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        hub.requests.append((self.command, path))
        try:
            body = self._body() if self.command in ("POST", "PUT") else b""
            with hub.lock:
                for failure in hub.failures:
                    if failure.method == self.command and re.search(failure.pattern, path) and failure.times != 0:
                        if failure.times is not None:
                            failure.times -= 1
                        raise HubError(failure.status, failure.message)
            route = _ROUTES if self.role == "hub" else _STORAGE_ROUTES
            for method, pattern, name in route:
                match = re.fullmatch(pattern, path)
                if match and method == self.command:
                    groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    if "dataset" in groups:  # dataset repos live beside model repos under "datasets/<id>"
                        groups["repo"] = f"datasets/{groups.pop('dataset')}"
                    getattr(self, name)(body=body, query=query, **groups)
                    return
            hub.unhandled.append((self.command, self.path))
            raise HubError(404, f"no route for {self.command} {path} in the test Hub")
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json(err.status, {"error": err.message, **err.extra}, headers)
        except Exception as err:  # a bug in this server: fail the test, not just the request
            hub.unhandled.append((self.command, f"{self.path} -> {type(err).__name__}: {err}"))
            self._json(500, {"error": f"test Hub bug: {err}"})

    do_GET = do_HEAD = do_POST = do_PUT = _handle

    # -- auth -----------------------------------------------------------------------------------
    def _user(self) -> tuple[str, set[str] | None] | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        """The repo, if the caller may see it (and write to it); otherwise the Hub's answers."""
        user = self._user()
        namespace = repo_id.removeprefix("datasets/").split("/")[0]
        allowed = user is not None and (user[1] is None or namespace in user[1])
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not allowed):
            # the Hub does not reveal private repos: without a token 401, with one 404
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write and not allowed:
            raise HubError(401 if user is None else 403,
                           "You must be authenticated to write to this repo" if user is None
                           else f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> Commit:
        oid = repo.branches.get(revision, revision)
        if oid not in repo.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    # -- API ------------------------------------------------------------------------------------
    def whoami(self, body, query) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json(200, {"type": "user", "name": user[0], "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def agent_harnesses(self, body, query) -> None:  # asked once a day for the User-Agent; none known here
        self._json(200, {"standardEnvVars": [], "harnesses": {}})

    def validate_yaml(self, body, query) -> None:
        import yaml

        content = json.loads(body)["content"]
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if match:
            try:
                meta = yaml.safe_load(match.group(1))
            except yaml.YAMLError as err:
                return self._json(400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []})
            if meta is not None and not isinstance(meta, dict):
                return self._json(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def create_repo(self, body, query) -> None:
        payload = json.loads(body)
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        namespace = payload.get("organization") or user[0]
        repo_id = f"{namespace}/{payload['name']}"
        if payload.get("type", "model") != "model":
            raise HubError(400, "the test Hub only hosts model repos")
        if user[1] is not None and namespace not in user[1]:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        with self.hub.lock:
            if repo_id in self.hub.repos:
                raise HubError(409, "You already created this model repo", extra={"url": f"{self.hub.url}/{repo_id}"})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.hub.create_repo(repo_id, private=private)
        self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def model_info(self, body, query, repo, rev="main") -> None:
        repository = self._repo(repo)
        commit = self._commit_of(repository, rev)
        repo = repo.removeprefix("datasets/")
        self._json(200, {"_id": repo, "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.oid,
                         "private": repository.private, "gated": False, "disabled": False,
                         "lastModified": commit.date, "createdAt": repository.created, "tags": [],
                         "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def refs(self, body, query, repo) -> None:
        repository = self._repo(repo)
        branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                    for name, oid in repository.branches.items()]
        self._json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def tree(self, body, query, repo, rev, path="") -> None:
        commit = self._commit_of(self._repo(repo), rev)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries, folders = [], set()
        for name, stored in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if not recursive and "/" in rest:
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append(_file_entry(name, stored))
        if recursive:
            folders = {"/".join(e["path"].split("/")[:i]) for e in entries for i in range(1, e["path"].count("/") + 1)}
        if prefix and not entries and not folders:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        self._json(200, [_dir_entry(f) for f in sorted(folders)] + entries)

    def paths_info(self, body, query, repo, rev) -> None:
        """``get_paths_info``: the entries (files as in ``tree``, folders) of the paths asked for."""
        commit = self._commit_of(self._repo(repo), rev)
        form = parse_qs(body.decode())
        wanted = form.get("paths", []) or json.loads(body or b"{}").get("paths", [])
        entries = []
        for path in (p.strip("/") for p in wanted):
            stored = commit.files.get(path)
            if stored is not None:
                entries.append(_file_entry(path, stored))
            elif any(name.startswith(f"{path}/") for name in commit.files):
                entries.append(_dir_entry(path))
        self._json(200, entries)

    def preupload(self, body, query, repo, rev) -> None:
        repository = self._repo(repo, write=True)
        commit = self._commit_of(repository, rev)
        files = []
        for item in json.loads(body)["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = (item["size"] >= LFS_MIN_SIZE or item["path"].lower().endswith(LFS_SUFFIXES) or b"\0" in sample)
            stored = commit.files.get(item["path"])
            remote_oid = None
            if stored is not None:
                remote_oid = stored.lfs_sha256 if lfs else (stored.blob_oid if stored.content is not None else None)
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": remote_oid})
        self._json(200, {"files": files, "commitOid": commit.oid})

    def lfs_batch(self, body, query, repo) -> None:
        self._repo(repo, write=True)
        payload = json.loads(body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "the test Hub supports LFS uploads with the basic transfer only")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.storage_url}/upload/{oid}?size={size}&sig={self.hub.sign(oid)}"},
                    "verify": {"href": f"{self.hub.url}/{repo}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def lfs_verify(self, body, query, repo) -> None:
        self._repo(repo, write=True)
        payload = json.loads(body)
        data = self.hub.lfs_objects.get(payload["oid"])
        if data is None or len(data) != payload["size"]:
            raise HubError(404, f"LFS object {payload['oid']} was not uploaded")
        self._json(200, {"success": True})

    def commit(self, body, query, repo, rev) -> None:
        repository = self._repo(repo, write=True)
        if query.get("create_pr"):
            raise HubError(400, "the test Hub does not do pull requests")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        with self.hub.lock:
            if rev not in repository.branches:
                raise HubError(404, f"Invalid rev id: {rev} is not a branch", "RevisionNotFound")
            head = repository.branches[rev]
            if header.get("parentCommit") and header["parentCommit"] != head:
                raise HubError(412, f"A commit has happened since {header['parentCommit']}: {head} is the head")
            files = dict(repository.commits[head].files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    content = base64.b64decode(value["content"])
                    files[value["path"]] = StoredFile.plain(content)
                elif key == "lfsFile":
                    data = self.hub.lfs_objects.get(value["oid"])
                    if data is None:
                        raise HubError(422, f"Your push was rejected because an LFS pointer pointed to a file "
                                            f"that does not exist ({value['path']})")
                    files[value["path"]] = StoredFile.lfs(value["oid"], len(data))
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(folder)}
                else:
                    raise HubError(400, f"the test Hub does not know commit operations of kind {key!r}")
            commit = self.hub._commit(repository, rev, files, header.get("summary") or "update")
        self._json(200, {"success": True, "commitOid": commit.oid, "pullRequestUrl": None, "hookOutput": "",
                         "commitUrl": f"{self.hub.url}/{repo}/commit/{commit.oid}"})

    def resolve(self, body, query, repo, rev, path) -> None:
        repository = self._repo(repo)
        commit = self._commit_of(repository, rev)
        stored = commit.files.get(path)
        headers = {"X-Repo-Commit": commit.oid}
        if stored is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers)
        if stored.lfs_sha256 is not None:
            oid = stored.lfs_sha256
            headers.update({"ETag": f'"{stored.blob_oid}"', "X-Linked-Etag": f'"{oid}"', "X-Linked-Size": stored.size,
                            "Location": f"{self.hub.storage_url}/objects/{oid}?sig={self.hub.sign(oid)}"})
            return self._send(302, b"", headers, content_type="text/plain")
        headers["ETag"] = f'"{stored.blob_oid}"'
        self._send_range(stored.content, headers)

    def _send_range(self, data: bytes, headers: dict) -> None:
        """``data``, or the part a ``Range: bytes=a-b`` header asks for (206), as fsspec reads parquet."""
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if not match:
            return self._send(200, data, headers, content_type="application/octet-stream")
        first, last = match.groups()
        start = int(first) if first else max(0, len(data) - int(last))
        end = min(int(last), len(data) - 1) if first and last else len(data) - 1
        headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}", "Accept-Ranges": "bytes"}
        self._send(206, data[start:end + 1], headers, content_type="application/octet-stream")

    # -- the storage origin ---------------------------------------------------------------------
    def _check_signature(self, oid: str, query) -> None:
        if not hmac.compare_digest(query.get("sig", [""])[0], self.hub.sign(oid)):
            raise HubError(403, "Request has expired or the signature does not match")

    def storage_put(self, body, query, oid) -> None:
        self._check_signature(oid, query)
        if hashlib.sha256(body).hexdigest() != oid or len(body) != int(query["size"][0]):
            raise HubError(400, "the uploaded content does not match its sha256 or size")
        with self.hub.lock:
            self.hub.lfs_objects[oid] = body
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def storage_get(self, body, query, oid) -> None:
        self._check_signature(oid, query)
        data = self.hub.lfs_objects.get(oid)
        if data is None:
            raise HubError(404, "NoSuchKey")
        self._send_range(data, {"ETag": f'"{oid}"'})


_ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("GET", rf"/api/models/{_REPO}", "model_info"),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", "model_info"),
    ("GET", rf"/api/models/{_REPO}/refs", "refs"),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
    ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", rf"/api/datasets/{_DATASET}", "model_info"),
    ("GET", rf"/api/datasets/{_DATASET}/revision/(?P<rev>[^/]+)", "model_info"),
    ("GET", rf"/api/datasets/{_DATASET}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", rf"/api/datasets/{_DATASET}/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("HEAD", rf"/datasets/{_DATASET}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", rf"/datasets/{_DATASET}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]
_STORAGE_ROUTES = [
    ("PUT", r"/upload/(?P<oid>[0-9a-f]{64})", "storage_put"),
    ("GET", r"/objects/(?P<oid>[0-9a-f]{64})", "storage_get"),
]


def hub_env(endpoint: str, home: Path) -> dict[str, str]:
    """The environment that points huggingface_hub (in a subprocess) at ``endpoint``, online, with its
    cache under ``home`` and the plain LFS upload path."""
    return {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
            "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}


def point_client_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path, token: str | None = TOKEN) -> None:
    """Make huggingface_hub in this process use ``endpoint``, an empty cache under ``home``, ``token``,
    online mode and the plain LFS upload path.

    The environment is set for subprocesses; in this process the values huggingface_hub read at
    import time are patched where it reads them at call time: ``constants.ENDPOINT`` (``HfApi()``),
    ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (``hf_hub_url``, so ``hf_hub_download``), the module-level
    ``HfApi`` behind ``huggingface_hub.upload_file`` & co., ``constants.HF_HUB_OFFLINE``
    (``is_offline_mode()``), ``HF_HUB_DISABLE_XET``, the cache and token paths.
    """
    from huggingface_hub import constants, hf_api

    home.mkdir(parents=True, exist_ok=True)
    for key, value in hub_env(endpoint, home).items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_TOKEN_PATH", "TRANSFORMERS_OFFLINE",
                "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    patches = {"ENDPOINT": endpoint,
               "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
               "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True, "HF_HOME": str(home),
               "HF_HUB_CACHE": str(home / "hub"), "HF_XET_CACHE": str(home / "xet"),
               "HF_ASSETS_CACHE": str(home / "assets"), "HF_TOKEN_PATH": str(home / "token"),
               "HF_STORED_TOKENS_PATH": str(home / "stored_tokens")}
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)


def point_datasets_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache: Path) -> None:
    """Make the ``datasets`` library in this process use ``endpoint``, online, with its cache at ``cache``
    (``datasets.config`` read these at import time); after ``point_client_at``."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", cache)
    monkeypatch.setattr("datasets.config.HF_ENDPOINT", endpoint)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
    """``HF_HUB_OFFLINE=1`` for this process (env and the constant huggingface_hub reads)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture
def hub_server(monkeypatch, tmp_path):
    """A running test Hub with the client pointed at it (see ``point_client_at``), token ``TOKEN``."""
    server = HubServer().start()
    point_client_at(monkeypatch, server.url, tmp_path / "hf-home")
    try:
        yield server
    finally:
        server.stop()
    assert not server.unhandled, f"requests the test Hub does not know: {server.unhandled}"

