"""A Hugging Face hub stand-in on 127.0.0.1, small but real HTTP, for the real `huggingface_hub` client.

Only what ckptflow uses, answered the way the hub answers (headers, error codes, JSON fields):

    GET  /api/models                                  list_models (author, search, sort, limit, cursor pages)
    GET  /api/models/{org}/{name}[/revision/{rev}]    model_info (?blobs=true: sizes, git oids, LFS sha256)
    HEAD/GET /{org}/{name}/resolve/{rev}/{path}       hf_hub_download (X-Repo-Commit, ETag, Range -> 206)
    POST /api/repos/create                            create_repo (409 when it exists)
    POST /api/models/{org}/{name}/preupload/{rev}     upload modes: always "regular" (content inline)
    POST /api/models/{org}/{name}/commit/{rev}        create_commit (ndjson: header, file, deletedFile, deletedFolder)
    POST /api/validate-yaml                           README.md front matter check (create_commit asks it)

Private repos answer 401 `RepoNotFound` without a valid token and gated ones 403 `GatedRepo` on downloads,
as the hub does. Test knobs: `tamper` (serve other bytes than the metadata says), `fail` (an HTTP status for a
file), `stall` (send part of a file, then hang until released), `throttle` (answer 429 N times). Every request
is logged in `requests` as (method, path) and every Authorization header value in `seen_tokens`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".gguf")


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    date: str


@dataclass
class Repo:
    id: str
    private: bool = False
    gated: bool | str = False
    created_at: str = field(default_factory=_now)
    commits: list[Commit] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        sha = self.refs.get(rev, rev)
        return next((c for c in self.commits if c.sha == sha), None)


class HubState:
    def __init__(self, tokens: tuple[str, ...] = ()):
        self.repos: dict[str, Repo] = {}
        self.tokens = set(tokens)
        self.gate_approved: set[str] = set()  # tokens allowed through gates
        self.tamper: dict[tuple[str, str], bytes] = {}
        self.fail: dict[tuple[str, str], int] = {}
        self.stall: dict[tuple[str, str], tuple[int, threading.Event]] = {}
        self.throttle: dict[str, int] = {}  # request kind ("list", "info", "resolve", "commit") -> 429s left
        self.page_size = 1000
        self.requests: list[tuple[str, str]] = []
        self.seen_tokens: list[str] = []
        self.lock = threading.RLock()

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        branch: str = "main",
        replace: bool = False,
        deleted: tuple[str, ...] = (),
        private: bool = False,
        gated: bool | str = False,
    ) -> str:
        """Add a commit on `branch` (creating the repo): `files` added or changed, `deleted` removed."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private=private, gated=gated))
            parent = repo.resolve(branch)
            tree = {} if replace or parent is None else dict(parent.files)
            tree.update(files)
            for d in deleted:
                tree = {p: v for p, v in tree.items() if p != d and not p.startswith(d.rstrip("/") + "/")}
            h = hashlib.sha1((parent.sha if parent else "").encode())
            for p in sorted(tree):
                h.update(f"{p}\0{git_oid(tree[p])}\n".encode())
            h.update(str(len(repo.commits)).encode())
            c = Commit(h.hexdigest(), tree, _now())
            repo.commits.append(c)
            repo.refs[branch] = c.sha
            return c.sha

    def sibling(self, path: str, data: bytes, blobs: bool) -> dict:
        s: dict = {"rfilename": path}
        if blobs:
            s.update(size=len(data), blobId=git_oid(data))
            if path.endswith(LFS_SUFFIXES):
                s["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return s

    def info(self, repo: Repo, commit: Commit, blobs: bool = False, siblings: bool = True) -> dict:
        d = {
            "id": repo.id,
            "_id": hashlib.md5(repo.id.encode()).hexdigest()[:24],
            "author": repo.id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
        }
        if siblings:
            d["siblings"] = [self.sibling(p, commit.files[p], blobs) for p in sorted(commit.files)]
        return d


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set on the subclass made per server

    def log_message(self, *args):  # quiet
        pass

    # ------------------------------------------------------------------------------------------ helpers

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth:
            self.state.seen_tokens.append(auth)
        return auth[7:] if auth.startswith("Bearer ") else None

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(
        self, status: int, code: str | None, message: str, head: bool = False, extra: dict | None = None
    ) -> None:
        h = {"X-Error-Message": message, **(extra or {})}
        if code:
            h["X-Error-Code"] = code
        self._json(status, {"error": message}, h, head)

    def _throttled(self, kind: str) -> bool:
        with self.state.lock:
            left = self.state.throttle.get(kind, 0)
            if left <= 0:
                return False
            self.state.throttle[kind] = left - 1
        self._error(429, None, "Too Many Requests", extra={"Retry-After": "0"})
        return True

    def _repo(self, repo_id: str, head: bool = False, download: bool = False) -> Repo | None:
        token = self._token()
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and token not in self.state.tokens):
            self._error(401 if repo is not None or token is None else 404, "RepoNotFound", "Repository not found", head)
            return None
        if download and repo.gated and token not in self.state.gate_approved:
            self._error(
                403,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. You must have access to it "
                "and be authenticated to access it. Please log in.",
                head,
            )
            return None
        return repo

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    # ----------------------------------------------------------------------------------------- routing

    def do_HEAD(self):
        self._route("HEAD")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        query = urllib.parse.parse_qs(url.query)
        self.state.requests.append((method, path))
        try:
            if method == "GET" and path == "/api/models":
                return self._list(query)
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/(.+))?", path):
                if method == "GET":
                    return self._model_info(m[1], m[2], query)
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo()
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml()
            if method == "POST" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)", path)):
                return self._preupload(m[1]) if m[2] == "preupload" else self._commit(m[1], m[3])
            if method in ("GET", "HEAD") and (m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)):
                return self._resolve(m[1], m[2], m[3], head=method == "HEAD")
            self._error(404, None, f"no route for {method} {path}", head=method == "HEAD")
        except (BrokenPipeError, ConnectionResetError):
            pass

    # --------------------------------------------------------------------------------------- endpoints

    def _list(self, query: dict) -> None:
        if self._throttled("list"):
            return
        token = self._token()
        st = self.state
        with st.lock:
            repos = [r for r in st.repos.values() if not r.private or token in st.tokens]
        if author := query.get("author", [None])[0]:
            repos = [r for r in repos if r.id.split("/")[0] == author]
        if search := query.get("search", [None])[0]:
            repos = [r for r in repos if search.lower() in r.id.lower()]
        sort = query.get("sort", [None])[0]
        if sort == "createdAt":
            repos.sort(key=lambda r: r.created_at, reverse=True)
        elif sort == "lastModified":
            repos.sort(key=lambda r: r.resolve("main").date, reverse=True)
        else:
            repos.sort(key=lambda r: r.id)
        cursor = int(query.get("cursor", ["0"])[0])
        page = repos[cursor : cursor + st.page_size]
        expand = query.get("expand", []) + query.get("expand[]", [])
        items = [st.info(r, r.resolve("main"), siblings="siblings" in expand) for r in page]
        headers = {}
        if cursor + st.page_size < len(repos):
            nxt = urllib.parse.urlencode(
                {**{k: v for k, v in query.items() if k != "cursor"}, "cursor": [cursor + st.page_size]}, doseq=True
            )
            headers["Link"] = f'<http://{self.headers["Host"]}/api/models?{nxt}>; rel="next"'
        self._json(200, items, headers)

    def _model_info(self, repo_id: str, rev: str | None, query: dict) -> None:
        if self._throttled("info"):
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        commit = repo.resolve(rev or "main")
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        self._json(200, self.state.info(repo, commit, blobs=query.get("blobs", ["false"])[0].lower() == "true"))

    def _resolve(self, repo_id: str, rev: str, filename: str, head: bool) -> None:
        if self._throttled("resolve"):
            return
        repo = self._repo(repo_id, head=head, download=True)
        if repo is None:
            return
        commit = repo.resolve(rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        if filename not in commit.files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", head, {"X-Repo-Commit": commit.sha})
        key = (repo_id, filename)
        if key in self.state.fail:
            return self._error(self.state.fail[key], None, "simulated failure", head)
        meta = commit.files[filename]
        data = self.state.tamper.get(key, meta)
        lfs = filename.endswith(LFS_SUFFIXES)
        etag = hashlib.sha256(meta).hexdigest() if lfs else git_oid(meta)
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        start = 0
        if not head and (rng := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))):
            start = int(rng[1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if head:
            return self._send(200, data, headers, head=True)
        stall = self.state.stall.get(key)
        if stall is None:
            return self._send(206 if start else 200, body, headers)
        after, release = stall
        self.send_response(206 if start else 200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:after])
        self.wfile.flush()
        release.wait(60)  # hang mid-file until the test releases (or the client is gone)
        self.close_connection = True

    def _create_repo(self) -> None:
        if self._token() not in self.state.tokens:
            return self._error(401, None, "Invalid credentials in Authorization header")
        payload = json.loads(self._body() or b"{}")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._json(
                    409,
                    {"error": "You already created this model repo", "url": f"http://{self.headers['Host']}/{repo_id}"},
                    {"X-Error-Message": "You already created this model repo"},
                )
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = self.state.repos[repo_id] = Repo(repo_id, private=private)
            repo.commits.append(
                Commit(
                    hashlib.sha1(repo_id.encode()).hexdigest(),
                    {".gitattributes": b"*.safetensors filter=lfs\n"},
                    _now(),
                )
            )
            repo.refs["main"] = repo.commits[0].sha
        self._json(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})

    def _validate_yaml(self) -> None:
        import yaml

        content = json.loads(self._body() or b"{}").get("content", "")
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(m[1]) if m else {}
            assert meta is None or isinstance(meta, dict), "front matter must be a mapping"
        except Exception as e:
            return self._json(400, {"errors": [{"message": f"invalid YAML front matter: {e}"}]})
        self._json(200, {"errors": [], "warnings": []})

    def _preupload(self, repo_id: str) -> None:
        if self._token() not in self.state.tokens:
            return self._error(401, None, "Invalid credentials in Authorization header")
        repo = self.state.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        files = json.loads(self._body())["files"]
        head = repo.resolve("main")
        out = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_oid(head.files[f["path"]]) if f["path"] in head.files else None,
            }
            for f in files
        ]
        self._json(200, {"files": out})

    def _commit(self, repo_id: str, rev: str) -> None:
        if self._throttled("commit"):
            return
        if self._token() not in self.state.tokens:
            return self._error(401, None, "Invalid credentials in Authorization header")
        if repo_id not in self.state.repos:
            return self._error(404, "RepoNotFound", "Repository not found")
        added, deleted = {}, []
        for line in self._body().splitlines():
            item = json.loads(line)
            v = item["value"]
            if item["key"] == "file":
                added[v["path"]] = base64.b64decode(v["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(v["path"])
            elif item["key"] == "lfsFile":
                return self._error(400, None, "this stand-in takes file contents inline only")
        sha = self.state.commit(repo_id, added, branch=urllib.parse.unquote(rev), deleted=tuple(deleted))
        self._json(
            200,
            {"success": True, "commitOid": sha, "commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{sha}"},
        )


class HubServer:
    """`with HubServer(tokens=("hf_x",)) as hub:` serves `hub.state` on `hub.url` (127.0.0.1, a free port)."""

    def __init__(self, tokens: tuple[str, ...] = ()):
        self.state = HubState(tokens)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hub-stand-in", daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for _, release in self.state.stall.values():
            release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """Paths of the files fully requested with GET (HEAD and ranged requests included only as GETs)."""
        out = []
        for method, path in self.state.requests:
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
            if method == "GET" and m and (repo_id is None or m[1] == repo_id):
                out.append(m[2])
        return out
