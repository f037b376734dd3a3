"""An in-process stand-in for the Hugging Face Hub's HTTP API, for tests.

The Hugging Face Hub's servers (huggingface.co) cannot be reached from the test machines, so this
module runs a tiny HTTP server on 127.0.0.1 that answers the handful of Hub endpoints our code
uses. It is only the *server* that is fake: the client code under test is the real, unmodified
``huggingface_hub`` library (``HfApi.create_repo``, ``HfApi.upload_folder``, ``hf_hub_download``,
``snapshot_download``, ...), pointed at this server with ``endpoint=hub.url``.

    with FakeHub() as hub:
        api = HfApi(endpoint=hub.url, token="fake-token")
        api.create_repo("me/adapter", exist_ok=True)
        api.upload_folder(repo_id="me/adapter", folder_path=folder, commit_message="add adapter")
        path = hf_hub_download("me/adapter", "adapter_config.json", endpoint=hub.url, cache_dir=tmp)
        assert hub.repos["me/adapter"]["adapter_config.json"] == Path(path).read_bytes()

What is implemented (model repos only; the Hub's behaviour was read off huggingface_hub 2.4's
client code, ``hf_api.py``, ``_commit_api.py``, ``_upload_pipeline.py``, ``lfs.py``,
``file_download.py`` and ``_snapshot_download.py``):

* ``POST /api/repos/create``                       create_repo (409 if it exists; ``exist_ok`` is client-side)
* ``POST /api/models/{ns}/{name}/preupload/{rev}``  upload modes: "regular" for every file (so the commit carries
  base64 content), unless ``FakeHub(lfs_threshold=N)`` makes files of N bytes or more "lfs"
* ``POST /{ns}/{name}.git/info/lfs/objects/batch`` + ``PUT /_fake_lfs/{sha256}``  the basic Git LFS upload
  (only reached with "lfs" upload modes *and* Xet disabled, i.e. ``HF_HUB_DISABLE_XET=1``: with ``hf_xet``
  installed the client uploads LFS files through the Xet protocol, which is not implemented)
* ``POST /api/models/{ns}/{name}/commit/{rev}``     ndjson commit: header, file (base64), lfsFile, deletedFile,
  deletedFolder; ``parentCommit`` is checked
* ``GET /api/models/{ns}/{name}[/revision/{rev}]``  model_info / repo_info (``sha``, ``siblings``, ...)
* ``GET /api/models/{ns}/{name}/tree/{rev}[/{path}]``  list_repo_tree / list_repo_files / snapshot_download
* ``HEAD|GET /{ns}/{name}/resolve/{rev}/{filename}``  file_exists / hf_hub_download: ``X-Repo-Commit``, ``ETag``
  (git blob sha1, or sha256 for LFS files plus ``X-Linked-Etag``/``X-Linked-Size``), ``Content-Length``,
  single ``Range: bytes=a-b`` requests; errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound,
  EntryNotFound) as the real Hub does, so the client raises its usual exceptions
* ``POST /api/models/{ns}/{name}/branch/{branch}``  create_branch (from ``startingPoint`` or main; 409 if it
  exists)
* ``POST /api/validate-yaml`` (accepts any README.md metadata; used by commits that touch README.md, e.g.
  transformers' ``push_to_hub``) and ``GET /api/whoami-v2``

Code that does not take an ``endpoint`` argument (transformers' ``from_pretrained``/``push_to_hub``,
``huggingface_hub.upload_folder`` and the other module-level functions) uses the endpoint frozen at
import time; ``with hub.as_default_endpoint(): ...`` redirects those to the fake Hub too.

Deliberate simplifications: any bearer token is accepted (but writes, and reads of private repos,
need *some* ``Authorization`` header, like on the Hub); a new repo starts with one empty commit
(the real Hub adds a ``.gitattributes`` file); revisions are branch names or full 40-hex commit
shas; branches start as ``main`` and are made by create_branch; no pull requests, tags, datasets or spaces.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["FakeHub", "Commit", "git_blob_sha1"]

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_LFS_PREFIX = "_fake_lfs"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob holding ``data`` (what the Hub uses as ETag of regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class _Blob:
    data: bytes
    lfs: bool = False

    @property
    def oid(self) -> str:  # what the tree API calls "oid"
        return git_blob_sha1(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:  # the Hub's ETag: sha256 for LFS files, git sha1 otherwise
        return self.sha256 if self.lfs else self.oid


@dataclass
class Commit:
    """One commit of a fake repo. ``files`` is the full tree after the commit."""

    oid: str
    parent: str | None
    message: str
    description: str
    added: list[str]
    deleted: list[str]
    date: str
    _tree: dict[str, _Blob] = field(repr=False)

    @property
    def files(self) -> dict[str, bytes]:
        return {path: blob.data for path, blob in self._tree.items()}


@dataclass
class _Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)

    def commit_by_oid(self, oid: str) -> Commit | None:
        return next((c for c in self.commits if c.oid == oid), None)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commit_by_oid(self.branches[revision])
        if _SHA_RE.match(revision):
            return self.commit_by_oid(revision)
        return None


class _HubError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None, extra: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}  # extra fields of the JSON error body


class FakeHub:
    """A fake Hugging Face Hub HTTP server, in memory, on ``127.0.0.1:<free port>``.

    Attributes / API:
      ``url``            base URL to pass as ``endpoint=`` (``http://127.0.0.1:PORT``)
      ``repos``          ``{repo_id: {filename: bytes}}``: the files at the head of ``main`` (a fresh copy)
      ``requests``       ``[(method, path)]`` of every HTTP request received (path unquoted, no query)
      ``request_log``    ``[(method, path, query, headers)]``, the same with query string and headers
      ``commits(repo_id)``  list of :class:`Commit` (oldest first; the first is the empty initial commit)
      ``head(repo_id, revision="main")``  commit sha a revision points to
      ``is_private(repo_id)``
      ``create_repo(repo_id, private=False)`` / ``commit(repo_id, files, message=..., delete=())``
                         seed repos directly, without HTTP (``commit`` returns the new sha)
      ``start()`` / ``stop()``, or ``with FakeHub() as hub: ...``
      ``with hub.as_default_endpoint(): ...``  also route endpoint-less calls (transformers) here

    ``lfs_threshold``: files of at least this many bytes get upload mode "lfs" in the preupload answer
    (default None: every file is "regular", which is what works with ``hf_xet`` installed).
    """

    def __init__(self, *, user: str = "fake-user", lfs_threshold: int | None = None):
        self.user = user
        self.lfs_threshold = lfs_threshold
        self.requests: list[tuple[str, str]] = []
        self.request_log: list[tuple[str, str, str, dict[str, str]]] = []
        self._repos: dict[str, _Repo] = {}
        self._lfs_objects: dict[str, bytes] = {}
        self._lock = threading.RLock()
        self._counter = 0
        # Commit shas must differ between FakeHub instances and test runs: a client cache that outlives a
        # FakeHub (e.g. the default ~/.cache/huggingface/hub) must never find a "known" sha with other content.
        self._salt = uuid.uuid4().hex
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "FakeHub":
        if self._server is not None:
            return self
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @contextlib.contextmanager
    def as_default_endpoint(self):
        """Make this fake Hub the default endpoint of the already-imported huggingface_hub (and transformers).

        ``HF_ENDPOINT`` is read once, at import time, and copied into several places; setting the env var
        later has no effect. This patches those copies and restores them on exit:
        ``huggingface_hub.constants.ENDPOINT`` and ``HUGGINGFACE_CO_URL_TEMPLATE`` (used by ``hf_hub_url``),
        the module-level ``HfApi`` behind ``huggingface_hub.create_repo``/``upload_folder``/..., and the
        lazily created shared ``HfApi`` of ``transformers.utils.hub`` (reset so it is rebuilt).
        """
        import sys

        from huggingface_hub import constants, hf_api

        patches = [
            (constants, "ENDPOINT", self.url),
            (constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.url + "/{repo_id}/resolve/{revision}/{filename}"),
            (hf_api.api, "endpoint", self.url),
        ]
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            patches.append((transformers_hub, "_hf_api", None))
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
        try:
            for obj, name, value in patches:
                setattr(obj, name, value)
            yield self
        finally:
            for obj, name, value in reversed(saved):
                setattr(obj, name, value)
            if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
                transformers_hub._hf_api = None  # may have been built with the fake endpoint

    # ------------------------------------------------------------------ inspection

    @property
    def repos(self) -> dict[str, dict[str, bytes]]:
        with self._lock:
            return {rid: repo.resolve("main").files for rid, repo in self._repos.items()}

    def commits(self, repo_id: str) -> list[Commit]:
        with self._lock:
            return list(self._get_repo(repo_id).commits)

    def head(self, repo_id: str, revision: str = "main") -> str:
        with self._lock:
            commit = self._get_repo(repo_id).resolve(revision)
            if commit is None:
                raise KeyError(f"{repo_id}@{revision}")
            return commit.oid

    def is_private(self, repo_id: str) -> bool:
        with self._lock:
            return self._get_repo(repo_id).private

    # ------------------------------------------------------------------ direct seeding (no HTTP)

    def create_repo(self, repo_id: str, private: bool = False) -> None:
        with self._lock:
            if repo_id in self._repos:
                raise ValueError(f"repo {repo_id} already exists")
            repo = _Repo(repo_id=repo_id, private=private)
            self._repos[repo_id] = repo
            self._add_commit(repo, "main", {}, "initial commit", "", added=[], deleted=[])

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        message: str = "commit",
        description: str = "",
        delete: tuple[str, ...] | list[str] = (),
        revision: str = "main",
        lfs: bool = False,
    ) -> str:
        with self._lock:
            repo = self._get_repo(repo_id)
            if revision not in repo.branches:
                raise KeyError(f"{repo_id} has no branch {revision!r}")
            tree = dict(repo.resolve(revision)._tree)
            for path in delete:
                tree.pop(path, None)
            for path, data in files.items():
                tree[path] = _Blob(bytes(data), lfs=lfs)
            return self._add_commit(repo, revision, tree, message, description, list(files), list(delete)).oid

    # ------------------------------------------------------------------ internals

    def _get_repo(self, repo_id: str) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise KeyError(repo_id)
        return repo

    def _add_commit(self, repo, branch, tree, message, description, added, deleted) -> Commit:
        self._counter += 1
        parent = repo.branches.get(branch)
        seed = json.dumps(
            [self._salt, self._counter, repo.repo_id, parent, message, sorted((p, b.oid) for p, b in tree.items())]
        )
        oid = hashlib.sha1(seed.encode()).hexdigest()
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        commit = Commit(oid, parent, message, description, added, deleted, date, tree)
        repo.commits.append(commit)
        repo.branches[branch] = oid
        return commit


# ---------------------------------------------------------------------- request handling


def _repo_not_found(repo_id: str) -> _HubError:
    return _HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake_hub: FakeHub  # set by FakeHub.start()

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # --- plumbing

    def _dispatch(self):
        split = urlsplit(self.path)
        self.segments = [unquote(s) for s in split.path.split("/")[1:]]
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        hub = self.fake_hub
        hub.requests.append((self.command, "/" + "/".join(self.segments)))
        hub.request_log.append((self.command, "/" + "/".join(self.segments), split.query, dict(self.headers)))
        self._body = None
        try:
            self._route()
        except _HubError as e:
            self._send_json({"error": e.message, **e.extra}, status=e.status, error=e)
        except Exception as e:  # a bug in the fake: say so loudly rather than hanging the client
            self._send_json({"error": f"FakeHub internal error: {e!r}"}, status=500)
            raise

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _read_body(self) -> bytes:
        if self._body is not None:
            return self._body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self._body = b"".join(chunks)
        else:
            self._body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return self._body

    def _json_body(self):
        try:
            return json.loads(self._read_body() or b"{}")
        except ValueError:
            raise _HubError(400, "Invalid JSON body")

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_length: int | None = None):
        if self.command in ("POST", "PUT"):
            self._read_body()  # never leave an unread body on a keep-alive connection
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, payload, status: int = 200, error: _HubError | None = None):
        headers = {"Content-Type": "application/json"}
        if error is not None:
            headers["X-Error-Message"] = error.message
            if error.code:
                headers["X-Error-Code"] = error.code
            headers.update(error.headers)
        self._send(status, json.dumps(payload).encode(), headers)

    def _require_auth(self):
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise _HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str, write: bool = False) -> _Repo:
        repo = self.fake_hub._repos.get(repo_id)
        if repo is None:
            raise _repo_not_found(repo_id)
        if (write or repo.private) and not self.headers.get("Authorization", "").startswith("Bearer "):
            raise _HubError(401, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    @staticmethod
    def _commit_of(repo: _Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # --- routing

    def _route(self):
        s, method = self.segments, self.command
        hub = self.fake_hub
        with hub._lock:
            if s[:1] == ["api"]:
                if s[1:] == ["repos", "create"] and method == "POST":
                    return self._create_repo()
                if s[1:] == ["validate-yaml"] and method == "POST":  # README.md metadata check before commits
                    self._json_body()
                    return self._send_json({"errors": [], "warnings": []})
                if s[1:] == ["whoami-v2"] and method == "GET":
                    self._require_auth()
                    return self._send_json(
                        {
                            "type": "user",
                            "name": hub.user,
                            "fullname": hub.user,
                            "orgs": [],
                            "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
                        }
                    )
                if len(s) >= 4 and s[1] == "models":
                    repo_id, rest = f"{s[2]}/{s[3]}", s[4:]
                    if not rest and method == "GET":
                        return self._model_info(repo_id, "main")
                    if len(rest) == 2 and rest[0] == "revision" and method == "GET":
                        return self._model_info(repo_id, rest[1])
                    if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
                        return self._tree(repo_id, rest[1], "/".join(rest[2:]))
                    if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
                        return self._preupload(repo_id, rest[1])
                    if len(rest) == 2 and rest[0] == "commit" and method == "POST":
                        return self._commit(repo_id, rest[1])
                    if len(rest) == 2 and rest[0] == "branch" and method == "POST":
                        return self._create_branch(repo_id, rest[1])
                if len(s) >= 2 and s[1] in ("datasets", "spaces", "kernels"):
                    raise _HubError(404, "FakeHub only serves model repos", "RepoNotFound")
            elif s[:1] == [_LFS_PREFIX] and len(s) == 2 and method == "PUT":
                return self._lfs_put(s[1])
            elif len(s) == 6 and s[1].endswith(".git") and s[2:] == ["info", "lfs", "objects", "batch"]:
                if method == "POST":
                    return self._lfs_batch(f"{s[0]}/{s[1][:-4]}")
            elif method in ("GET", "HEAD"):
                if len(s) >= 4 and s[1] == "resolve":
                    raise _repo_not_found(s[0])  # un-namespaced ids ("gpt2") never exist here
                if len(s) >= 5 and s[2] == "resolve" and s[0] not in ("datasets", "spaces", "kernels"):
                    return self._resolve(f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
                if len(s) >= 5 and s[0] in ("datasets", "spaces", "kernels"):
                    raise _HubError(404, "FakeHub only serves model repos", "RepoNotFound")
        raise _HubError(404, f"FakeHub does not implement {method} {'/'.join(s)}")

    # --- endpoints

    def _create_repo(self):
        self._require_auth()
        body = self._json_body()
        if body.get("type") not in (None, "model"):
            raise _HubError(400, "FakeHub only creates model repos")
        name = body.get("name")
        if not name:
            raise _HubError(400, "Missing repo name")
        repo_id = f"{body.get('organization') or self.fake_hub.user}/{name}"
        url = f"{self.fake_hub.url}/{repo_id}"
        if repo_id in self.fake_hub._repos:
            # the client reads "url" from the 409 answer too (create_repo(..., exist_ok=True))
            raise _HubError(409, "You already created this model repo", extra={"url": url})
        self.fake_hub.create_repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
        self._send_json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _create_branch(self, repo_id: str, branch: str):
        repo = self._repo(repo_id, write=True)
        if branch in repo.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")  # exist_ok is client-side
        start = self._json_body().get("startingPoint") or "main"
        repo.branches[branch] = self._commit_of(repo, start).oid
        self._send_json({})

    def _model_info(self, repo_id: str, revision: str):
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, revision)
        files = sorted(commit._tree)
        payload = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.commits[0].date,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [{"rfilename": f} for f in files],
        }
        if self.query.get("blobs", "").lower() == "true":
            for sibling in payload["siblings"]:
                blob = commit._tree[sibling["rfilename"]]
                sibling.update(self._file_entry(sibling["rfilename"], blob))
                del sibling["type"], sibling["path"]
        self._send_json(payload)

    @staticmethod
    def _file_entry(path: str, blob: _Blob) -> dict:
        entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": 134}
        return entry

    def _tree(self, repo_id: str, revision: str, path: str):
        commit = self._commit_of(self._repo(repo_id), revision)
        recursive = self.query.get("recursive", "").lower() in ("true", "1")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit._tree):
            raise _HubError(404, f"Path {path} not found in tree", "EntryNotFound")
        dirs, files = set(), []
        for p in sorted(commit._tree):
            if not p.startswith(prefix):
                continue
            rel_parts = p[len(prefix) :].split("/")
            for i in range(1, len(rel_parts)):
                if recursive or i == 1:
                    dirs.add(prefix + "/".join(rel_parts[:i]))
            if recursive or len(rel_parts) == 1:
                files.append(self._file_entry(p, commit._tree[p]))
        entries = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(dirs)
        ]
        self._send_json(entries + files)

    def _preupload(self, repo_id: str, revision: str):
        repo = self._repo(repo_id, write=True)
        if self.query.get("create_pr"):
            raise _HubError(400, "FakeHub does not support pull requests")
        commit = self._commit_of(repo, revision)
        threshold = self.fake_hub.lfs_threshold
        answer = []
        for f in self._json_body().get("files", []):
            mode = "lfs" if threshold is not None and f.get("size", 0) >= threshold else "regular"
            existing = commit._tree.get(f["path"])
            oid = None if existing is None else (existing.sha256 if mode == "lfs" else existing.oid)
            answer.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json({"files": answer, "commitOid": commit.oid})

    def _commit(self, repo_id: str, revision: str):
        repo = self._repo(repo_id, write=True)
        if self.query.get("create_pr"):
            raise _HubError(400, "FakeHub does not support pull requests")
        if revision not in repo.branches:
            raise _HubError(404, f"Invalid rev id: {revision} (FakeHub commits to branches only)", "RevisionNotFound")
        base = self._commit_of(repo, revision)
        tree = dict(base._tree)
        header, added, deleted = {}, [], []
        for line in self._read_body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                tree[value["path"]] = _Blob(base64.b64decode(value["content"]))
                added.append(value["path"])
            elif key == "lfsFile":
                data = self.fake_hub._lfs_objects.get(value["oid"])
                if data is None:
                    raise _HubError(422, f"LFS object {value['oid']} was never uploaded ({value['path']})")
                tree[value["path"]] = _Blob(data, lfs=True)
                added.append(value["path"])
            elif key == "deletedFile":
                if value["path"] not in tree:
                    raise _HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                del tree[value["path"]]
                deleted.append(value["path"])
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                for p in [p for p in tree if p.startswith(folder)]:
                    del tree[p]
                    deleted.append(p)
            else:
                raise _HubError(400, f"FakeHub does not support commit operation {key!r}")
        parent = header.get("parentCommit")
        if parent is not None and not base.oid.startswith(parent):
            raise _HubError(412, f"A commit has happened since. Parent commit {parent} is not the head of {revision}")
        if not header.get("summary"):
            raise _HubError(400, "Missing commit summary")
        commit = self.fake_hub._add_commit(
            repo, revision, tree, header["summary"], header.get("description", ""), added, deleted
        )
        self._send_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "hookOutput": "",
                "commitUrl": f"{self.fake_hub.url}/{repo_id}/commit/{commit.oid}",
            }
        )

    def _resolve(self, repo_id: str, revision: str, filename: str):
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, revision)
        blob = commit._tree.get(filename)
        if blob is None:
            raise _HubError(404, f"Entry not found: {filename}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = len(blob.data)
        data, status = blob.data, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and self.command == "GET" and (match.group(1) or match.group(2)):
            size = len(data)
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:  # suffix range: last N bytes
                start, end = max(size - int(match.group(2)), 0), size - 1
            if start >= size or start > end:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}", **headers})
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers)

    def _lfs_batch(self, repo_id: str):
        self._repo(repo_id, write=True)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise _HubError(400, "FakeHub only supports LFS uploads")
        objects = []
        for obj in body.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.fake_hub._lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.fake_hub.url}/{_LFS_PREFIX}/{obj['oid']}"}}
            objects.append(entry)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_put(self, oid: str):
        data = self._read_body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise _HubError(400, f"sha256 mismatch for LFS object {oid}")
        self.fake_hub._lfs_objects[oid] = data
        self._send(200)
