"""A local server speaking the part of the Hugging Face Hub HTTP API that the real
``huggingface_hub`` client (create_repo, create_commit, upload_folder, create_branch,
list_repo_tree, get_paths_info, hf_hub_download, snapshot_download) and the real
``datasets.load_dataset`` (through ``HfFileSystem``, streaming included) use.

Run: ``python tests/hub_server.py --root DIR [--port 0] [--tokens FILE]``; it prints
``READY http://127.0.0.1:PORT`` once it listens. Clients point ``HF_ENDPOINT`` at it.

What it speaks:
- ``POST /api/repos/create`` (public/private, 409 when it exists), repo info
  (``/api/{type}s/{id}[/revision/{rev}]``), ``/api/{type}s/{id}/refs``, ``/branch/{name}``;
- uploads: ``preupload`` (lfs vs regular, remote oid), the git-LFS batch API (no actions for
  objects already stored, so an interrupted upload resumes without sending them again), a
  signed PUT upload URL (like S3's presigned URLs: no Authorization header), ``verify``, and
  the ndjson ``commit`` (parentCommit checked);
- reads: ``tree`` (recursive, expand, paginated with a Link header), ``paths-info``,
  ``resolve`` (GET/HEAD, Range, ETag, X-Repo-Commit, X-Linked-Size/Etag).
- No Xet: ``xet-*-token`` endpoints answer 400 with a message. huggingface_hub uses Xet for
  uploads whenever the ``hf_xet`` package is installed, so clients of this server run with
  ``HF_HUB_DISABLE_XET=1`` and take the git-LFS path. Downloads never use Xet here because
  responses carry no ``X-Xet-Hash``.

Auth as the Hub answers: a token not in the list → 401 "Invalid credentials in Authorization
header"; no token on a write → 401; a read token on a write, or a namespace the token's user
does not own → 403; a private repo read without access → 401 (anonymous) / 404 (logged in)
with ``X-Error-Code: RepoNotFound``.

Storage is a plain folder: ``blobs/<sha256>`` (content addressed, written atomically),
``repos/<type>/<ns>/<name>/repo.json`` (visibility, branches → commit) and
``.../commits/<oid>.json`` (the full file table of each commit), plus ``events.jsonl``: one
line per upload, commit, etc., so tests can count what was sent.

Fault injection (tests): ``POST /_test/faults`` with JSON ``{"drop_lfs_after": K,
"drop_count": N}`` drops the connection of the next N LFS uploads once K have succeeded
(``drop_count`` -1: all of them), ``{"stall_lfs_after": K}`` makes uploads after the K-th
hang (the test then SIGKILLs the client); ``{}`` clears. ``CAPSFUS_HUB_FAULTS`` (same JSON)
sets them at start.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".parquet", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                ".arrow", ".zst", ".gz", ".tar", ".zip", ".gguf", ".onnx", ".npy", ".npz",
                ".pkl", ".pickle", ".model", ".png", ".jpg", ".jpeg")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
PAGE_SIZE = 50          # tree page size: small, so pagination is exercised by the tests
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
            f"size {size}\n").encode()


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Store:
    """Blobs, repos and commits in a folder; every mutation under one lock."""

    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    def event(self, kind: str, **fields) -> None:
        with self.lock, open(self.root / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")

    def repo_dir(self, rtype: str, repo_id: str) -> Path:
        return self.root / "repos" / rtype / repo_id

    def repo(self, rtype: str, repo_id: str) -> dict | None:
        p = self.repo_dir(rtype, repo_id) / "repo.json"
        return json.loads(p.read_text()) if p.exists() else None

    def save_repo(self, rtype: str, repo_id: str, meta: dict) -> None:
        write_atomic(self.repo_dir(rtype, repo_id) / "repo.json", json.dumps(meta).encode())

    def commit(self, rtype: str, repo_id: str, oid: str) -> dict | None:
        p = self.repo_dir(rtype, repo_id) / "commits" / f"{oid}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def has_blob(self, sha: str, size: int | None = None) -> bool:
        p = self.blobs / sha
        return p.exists() and (size is None or p.stat().st_size == size)

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha):
            write_atomic(self.blobs / sha, data)
        return sha

    def resolve_rev(self, rtype: str, repo_id: str, meta: dict, rev: str) -> dict:
        rev = unquote(rev)
        name = rev[len("refs/heads/"):] if rev.startswith("refs/heads/") else rev
        if name in meta["branches"]:
            return self.commit(rtype, repo_id, meta["branches"][name])
        if re.fullmatch(r"[0-9a-f]{40}", rev) and (c := self.commit(rtype, repo_id, rev)):
            return c
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def new_commit(self, rtype: str, repo_id: str, parent: dict | None, files: dict,
                   message: str, description: str = "") -> dict:
        body = {"parent": parent["oid"] if parent else None, "message": message,
                "description": description, "date": now_iso(), "files": files}
        oid = hashlib.sha1(json.dumps(body, sort_keys=True).encode()
                           + secrets.token_bytes(8)).hexdigest()
        body["oid"] = oid
        for entry in files.values():
            entry.setdefault("last_commit", oid)
        write_atomic(self.repo_dir(rtype, repo_id) / "commits" / f"{oid}.json",
                     json.dumps(body).encode())
        return body


def file_entry(data_sha: str, size: int, lfs: bool, content: bytes | None) -> dict:
    git_oid = git_blob_oid(lfs_pointer(data_sha, size) if lfs else content)
    return {"sha256": data_sha, "size": size, "lfs": lfs, "git_oid": git_oid}


class Hub:
    """Request routing and the Hub's answers. ``tokens``: token → {user, role, orgs}."""

    def __init__(self, store: Store, tokens: dict, faults: dict):
        self.store = store
        self.tokens = tokens
        self.faults = faults
        self.secret = secrets.token_bytes(16)
        self.lfs_uploads_ok = 0
        self.lfs_dropped = 0
        self.base = ""   # set once the port is known

    # -- auth --------------------------------------------------------------------------
    def who(self, headers) -> dict | None:
        auth = headers.get("Authorization", "")
        if not auth:
            return None
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else auth
        info = self.tokens.get(token)
        if info is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return info

    @staticmethod
    def owns(user: dict | None, namespace: str) -> bool:
        return user is not None and (namespace == user["user"]
                                     or namespace in user.get("orgs", []))

    def can_read(self, user: dict | None, rtype: str, repo_id: str) -> dict:
        meta = self.store.repo(rtype, repo_id)
        if meta is None or (meta["private"] and not self.owns(user, repo_id.split("/")[0])):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return meta

    def can_write(self, user: dict | None, rtype: str, repo_id: str, creating=False) -> dict:
        if user is None:
            raise HubError(401, "Invalid username or password.")
        ns = repo_id.split("/")[0]
        if not creating:
            meta = self.can_read(user, rtype, repo_id)
        if user["role"] != "write":
            raise HubError(403, f"You don't have the rights to {'create' if creating else 'write to'}"
                                f" a {rtype} under the namespace \"{ns}\": this token is read-only")
        if not self.owns(user, ns):
            raise HubError(403, f"You don't have the rights to create a {rtype} under the "
                                f"namespace \"{ns}\"")
        return None if creating else meta

    # -- repos -------------------------------------------------------------------------
    def create_repo(self, user, body: dict):
        rtype = body.get("type") or "model"
        ns = body.get("organization") or (user or {}).get("user")
        repo_id = f"{ns}/{body['name']}"
        self.can_write(user, rtype, repo_id, creating=True)
        private = body.get("private")
        if private is None:
            private = body.get("visibility") == "private"
        with self.store.lock:
            if self.store.repo(rtype, repo_id) is not None:
                raise HubError(409, "You already created this repo",   # the Hub adds the url
                               url=f"{self.base}/{PREFIX[rtype]}{repo_id}")
            data = GITATTRIBUTES.encode()
            files = {".gitattributes": file_entry(self.store.put_blob(data), len(data), False,
                                                  data)}
            c = self.store.new_commit(rtype, repo_id, None, files, "initial commit")
            self.store.save_repo(rtype, repo_id, {"private": bool(private), "created": now_iso(),
                                                  "branches": {"main": c["oid"]}})
        self.store.event("create_repo", repo=repo_id, type=rtype, private=bool(private))
        return 200, {"url": f"{self.base}/{PREFIX[rtype]}{repo_id}", "name": repo_id,
                     "id": repo_id}

    def repo_info(self, user, rtype, repo_id, rev="main"):
        meta = self.can_read(user, rtype, repo_id)
        c = self.store.resolve_rev(rtype, repo_id, meta, rev)
        return 200, {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id,
                     "author": repo_id.split("/")[0], "sha": c["oid"], "private": meta["private"],
                     "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                     "createdAt": meta["created"], "lastModified": c["date"],
                     "siblings": [{"rfilename": p} for p in sorted(c["files"])],
                     "usedStorage": sum(f["size"] for f in c["files"].values())}

    def refs(self, user, rtype, repo_id):
        meta = self.can_read(user, rtype, repo_id)
        return 200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
                                  for b, oid in meta["branches"].items()],
                     "converts": [], "tags": []}

    def create_branch(self, user, rtype, repo_id, branch, body):
        branch = unquote(branch)
        with self.store.lock:
            meta = self.can_write(user, rtype, repo_id)
            if branch in meta["branches"]:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            start = self.store.resolve_rev(rtype, repo_id, meta,
                                           body.get("startingPoint") or "main")
            meta["branches"][branch] = start["oid"]
            self.store.save_repo(rtype, repo_id, meta)
        self.store.event("create_branch", repo=repo_id, branch=branch)
        return 200, {}

    # -- uploads -----------------------------------------------------------------------
    def preupload(self, user, rtype, repo_id, rev, body):
        meta = self.can_write(user, rtype, repo_id)
        c = self.store.resolve_rev(rtype, repo_id, meta, rev)
        out = []
        for f in body.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = (f["path"].lower().endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
                   or b"\0" in sample)
            remote = c["files"].get(f["path"])
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False, "oid": None if remote is None else
                        remote["sha256"] if remote["lfs"] else remote["git_oid"]})
        return 200, {"files": out, "commitOid": c["oid"]}

    def sign(self, oid: str, size: int) -> str:
        return hmac.new(self.secret, f"{oid}:{size}".encode(), "sha256").hexdigest()

    def lfs_batch(self, user, rtype, repo_id, body):
        self.can_write(user, rtype, repo_id)
        if body.get("operation") != "upload":
            raise HubError(400, "only the upload operation is implemented")
        objects = []
        for o in body.get("objects", []):
            oid, size = o["oid"], int(o["size"])
            obj = {"oid": oid, "size": size, "authenticated": True}
            if not self.store.has_blob(oid, size):
                obj["actions"] = {
                    "upload": {"href": f"{self.base}/_lfs/{oid}?size={size}"
                                       f"&sig={self.sign(oid, size)}", "header": {}},
                    "verify": {"href": f"{self.base}/{PREFIX[rtype]}{repo_id}.git/info/lfs/"
                                       f"objects/verify", "header": {}}}
            objects.append(obj)
        self.store.event("lfs_batch", repo=repo_id, objects=len(objects),
                         to_upload=sum("actions" in o for o in objects))
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_verify(self, user, rtype, repo_id, body):
        self.can_write(user, rtype, repo_id)
        if not self.store.has_blob(body["oid"], int(body["size"])):
            raise HubError(404, f"Object {body['oid']} not found")
        return 200, {}

    def commit(self, user, rtype, repo_id, rev, raw: bytes, query: dict):
        if query.get("create_pr"):
            raise HubError(400, "this test server does not implement pull requests")
        lines = [json.loads(x) for x in raw.decode().splitlines() if x.strip()]
        with self.store.lock:
            meta = self.can_write(user, rtype, repo_id)
            branch = unquote(rev)
            branch = branch[len("refs/heads/"):] if branch.startswith("refs/heads/") else branch
            if branch not in meta["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = self.store.commit(rtype, repo_id, meta["branches"][branch])
            files = {p: dict(e) for p, e in head["files"].items()}
            header = {}
            for line in lines:
                key, v = line["key"], line["value"]
                if key == "header":
                    header = v
                    if v.get("parentCommit") and v["parentCommit"] != head["oid"]:
                        raise HubError(412, "A commit has happened since. Please refresh and "
                                            "try again.")
                elif key == "file":
                    data = base64.b64decode(v["content"])
                    files[v["path"]] = file_entry(self.store.put_blob(data), len(data), False,
                                                  data)
                elif key == "lfsFile":
                    if not self.store.has_blob(v["oid"], v.get("size")):
                        raise HubError(422, f"LFS object {v['oid']} for {v['path']} was not "
                                            f"uploaded")
                    size = v.get("size") or (self.store.blobs / v["oid"]).stat().st_size
                    files[v["path"]] = file_entry(v["oid"], size, True, None)
                elif key == "deletedFile":
                    if files.pop(v["path"], None) is None:
                        raise HubError(404, f"File not found: {v['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    pre = v["path"].rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(pre)]:
                        del files[p]
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
            for p, e in files.items():   # unchanged files keep the commit that last changed them
                if p in head["files"] and head["files"][p]["git_oid"] == e["git_oid"]:
                    e["last_commit"] = head["files"][p].get("last_commit", head["oid"])
                else:
                    e.pop("last_commit", None)
            c = self.store.new_commit(rtype, repo_id, head, files, header.get("summary", ""),
                                      header.get("description", ""))
            meta["branches"][branch] = c["oid"]
            self.store.save_repo(rtype, repo_id, meta)
        self.store.event("commit", repo=repo_id, branch=branch, oid=c["oid"],
                         files=[line["value"]["path"] for line in lines
                                if line["key"] != "header"])
        return 200, {"success": True, "commitOid": c["oid"], "hookOutput": "",
                     "commitUrl": f"{self.base}/{PREFIX[rtype]}{repo_id}/commit/{c['oid']}",
                     "pullRequestUrl": None}

    # -- reads -------------------------------------------------------------------------
    def entries(self, c: dict, expand: bool) -> dict:
        """path → tree entry, directories included."""
        out = {}
        for path, e in c["files"].items():
            item = {"type": "file", "oid": e["git_oid"], "size": e["size"], "path": path}
            if e["lfs"]:
                item["lfs"] = {"oid": e["sha256"], "size": e["size"],
                               "pointerSize": len(lfs_pointer(e["sha256"], e["size"]))}
            if expand:
                lc = self.store_commit_cache.get(e.get("last_commit")) or c
                item["lastCommit"] = {"id": lc["oid"], "title": lc["message"], "date": lc["date"]}
            out[path] = item
            parts = path.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                out.setdefault(d, {"type": "directory", "path": d,
                                   "oid": hashlib.sha1(d.encode() + c["oid"].encode()).hexdigest(),
                                   "size": 0})
        return out

    def _with_commits(self, rtype, repo_id, c):
        self.store_commit_cache = {}
        for e in c["files"].values():
            lc = e.get("last_commit")
            if lc and lc not in self.store_commit_cache:
                self.store_commit_cache[lc] = self.store.commit(rtype, repo_id, lc)

    def tree(self, user, rtype, repo_id, rev, path, query):
        meta = self.can_read(user, rtype, repo_id)
        c = self.store.resolve_rev(rtype, repo_id, meta, rev)
        expand = query.get("expand", "false").lower() == "true"
        recursive = query.get("recursive", "false").lower() == "true"
        with self.store.lock:
            self._with_commits(rtype, repo_id, c)
            entries = self.entries(c, expand)
        path = unquote(path).strip("/")
        if path and (path not in entries or entries[path]["type"] != "directory"):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        pre = path + "/" if path else ""
        items = [e for p, e in sorted(entries.items()) if p.startswith(pre) and p != path
                 and (recursive or "/" not in p[len(pre):])]
        start = int(query.get("cursor", "0"))
        page = items[start:start + PAGE_SIZE]
        link = None
        if start + PAGE_SIZE < len(items):
            q = f"recursive={str(recursive).lower()}&expand={str(expand).lower()}"
            link = (f"<{self.base}/api/{rtype}s/{repo_id}/tree/{quote(unquote(rev), safe='')}"
                    f"/{quote(path)}?{q}&cursor={start + PAGE_SIZE}>; rel=\"next\"")
        return 200, page, ({"Link": link} if link else {})

    def paths_info(self, user, rtype, repo_id, rev, form: dict):
        meta = self.can_read(user, rtype, repo_id)
        c = self.store.resolve_rev(rtype, repo_id, meta, rev)
        expand = str(form.get("expand", ["false"])[0]).lower() == "true"
        with self.store.lock:
            self._with_commits(rtype, repo_id, c)
            entries = self.entries(c, expand)
        return 200, [entries[p.strip("/")] for p in form.get("paths", [])
                     if p.strip("/") in entries]

    def resolve(self, user, rtype, repo_id, rev, path):
        meta = self.can_read(user, rtype, repo_id)
        c = self.store.resolve_rev(rtype, repo_id, meta, rev)
        e = c["files"].get(unquote(path))
        if e is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        return c, e


def validate_yaml(body: dict):
    """The card's YAML header must parse to a mapping with list-valued list fields (the Hub
    checks more: licence ids, task names)."""
    import yaml
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", body.get("content", ""), re.S)
    if not m:
        return 200, {"warnings": [{"message": "Empty or missing yaml metadata in repo card"}]}
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        return 400, {"errors": [{"message": f"Invalid YAML: {e}"}]}
    if not isinstance(meta, dict):
        return 400, {"errors": [{"message": "YAML metadata must be a mapping"}]}
    errors = [{"message": f'"{k}" must be a list'} for k in ("tags", "configs", "task_categories")
              if k in meta and not isinstance(meta[k], list)]
    errors += [{"message": '"license" must be a string'}
               for _ in [0] if "license" in meta and not isinstance(meta["license"], str)]
    return (400, {"errors": errors}) if errors else (200, {"warnings": []})


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: Hub   # set on the class by serve()

    def log_message(self, fmt, *args):   # quiet unless asked
        if os.environ.get("CAPSFUS_HUB_VERBOSE"):
            sys.stderr.write("hub: " + fmt % args + "\n")

    # -- plumbing ----------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None,
              ctype="application/json"):
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, e: HubError):
        headers = {"X-Error-Message": e.message}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._send(e.status, {"error": e.message, **e.extra}, headers)

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def _dispatch(self):
        url = urlsplit(self.path)
        path = url.path
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        hub = self.hub
        try:
            if path.startswith("/_lfs/"):
                return self._lfs_put(path[len("/_lfs/"):], query)
            if path == "/_test/faults" and self.command == "POST":
                hub.faults.clear()
                hub.faults.update(json.loads(self._body() or b"{}"))
                hub.lfs_uploads_ok = hub.lfs_dropped = 0
                return self._send(200, hub.faults)
            body = self._body() if self.command in ("POST", "PUT") else b""
            user = hub.who(self.headers)
            if path == "/api/whoami-v2":
                if user is None:
                    raise HubError(401, "Invalid username or password.")
                return self._send(200, {
                    "type": "user", "name": user["user"], "fullname": user["user"],
                    "orgs": [{"name": o, "type": "org"} for o in user.get("orgs", [])],
                    "auth": {"type": "access_token",
                             "accessToken": {"displayName": "test", "role": user["role"]}}})
            if path == "/api/validate-yaml" and self.command == "POST":
                return self._send(*validate_yaml(json.loads(body)))
            if path == "/api/repos/create" and self.command == "POST":
                return self._send(*hub.create_repo(user, json.loads(body)))
            m = re.fullmatch(r"/api/(model|dataset|space)s/([^/]+/[^/]+)(?:/(.*))?", path)
            if m:
                return self._api(user, m.group(1), m.group(2), m.group(3) or "", body, query)
            m = re.fullmatch(r"/(datasets/|spaces/)?([^/]+/[^/]+)\.git/info/lfs/objects/"
                             r"(batch|verify)", path)
            if m and self.command == "POST":
                rtype = {"datasets/": "dataset", "spaces/": "space"}.get(m.group(1), "model")
                fn = hub.lfs_batch if m.group(3) == "batch" else hub.lfs_verify
                return self._send(*fn(user, rtype, m.group(2), json.loads(body)),
                                  ctype="application/vnd.git-lfs+json")
            m = re.fullmatch(r"/(datasets/|spaces/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m and self.command in ("GET", "HEAD"):
                rtype = {"datasets/": "dataset", "spaces/": "space"}.get(m.group(1), "model")
                return self._resolve(user, rtype, m.group(2), m.group(3), m.group(4))
            raise HubError(404, f"Sorry, we can't find the page you are looking for ({path})")
        except HubError as e:
            if e.status == 404 and os.environ.get("CAPSFUS_HUB_VERBOSE"):
                sys.stderr.write(f"hub: 404 {self.command} {self.path}: {e.message}\n")
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:          # a bug or a truncated request: say so, keep serving
            import traceback
            traceback.print_exc()
            try:
                self._error(HubError(500, f"internal error: {type(e).__name__}"))
            except OSError:
                pass

    def _api(self, user, rtype, repo_id, rest, body, query):
        hub, cmd = self.hub, self.command
        if rest.startswith("xet-"):
            raise HubError(400, "this test server does not implement Xet storage: run the "
                                "client with HF_HUB_DISABLE_XET=1")
        if rest == "" and cmd in ("GET", "HEAD"):
            return self._send(*hub.repo_info(user, rtype, repo_id))
        if m := re.fullmatch(r"revision/(.+)", rest):
            return self._send(*hub.repo_info(user, rtype, repo_id, m.group(1)))
        if rest == "refs":
            return self._send(*hub.refs(user, rtype, repo_id))
        if (m := re.fullmatch(r"branch/(.+)", rest)) and cmd == "POST":
            return self._send(*hub.create_branch(user, rtype, repo_id, m.group(1),
                                                 json.loads(body or b"{}")))
        if (m := re.fullmatch(r"preupload/([^/]+)", rest)) and cmd == "POST":
            return self._send(*hub.preupload(user, rtype, repo_id, m.group(1), json.loads(body)))
        if (m := re.fullmatch(r"commit/([^/]+)", rest)) and cmd == "POST":
            return self._send(*hub.commit(user, rtype, repo_id, m.group(1), body, query))
        if m := re.fullmatch(r"tree/([^/]+)(?:/(.*))?", rest):
            status, page, headers = hub.tree(user, rtype, repo_id, m.group(1), m.group(2) or "",
                                             query)
            return self._send(status, page, headers)
        if (m := re.fullmatch(r"paths-info/([^/]+)", rest)) and cmd == "POST":
            ctype = self.headers.get("Content-Type", "")
            if ctype.startswith("application/json"):
                form = json.loads(body)
                form = {"paths": form.get("paths", []), "expand": [form.get("expand", False)]}
            else:
                form = parse_qs(body.decode())
            return self._send(*hub.paths_info(user, rtype, repo_id, m.group(1), form))
        raise HubError(404, f"Sorry, we can't find the page you are looking for (/{rest})")

    def _resolve(self, user, rtype, repo_id, rev, path):
        c, e = self.hub.resolve(user, rtype, repo_id, rev, path)
        blob = self.hub.store.blobs / e["sha256"]
        size = e["size"]
        etag = e["sha256"] if e["lfs"] else e["git_oid"]
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": c["oid"], "Accept-Ranges": "bytes"}
        if e["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng and (m := re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())):
            if m.group(1) == "":
                start, end = max(0, size - int(m.group(2))), size - 1
            else:
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            if start >= size and size > 0:
                return self._send(416, {"error": "Requested range not satisfiable"},
                                  {"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        n = max(0, end - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(blob, "rb") as f:
            f.seek(start)
            left = n
            while left:
                chunk = f.read(min(left, 1 << 20))
                self.wfile.write(chunk)
                left -= len(chunk)

    def _lfs_put(self, oid, query):
        """The presigned upload URL: stream to a temp file, check sha256 and size, rename."""
        hub = self.hub
        size = int(query.get("size", "-1"))
        if self.command != "PUT" or not hmac.compare_digest(query.get("sig", ""),
                                                            hub.sign(oid, size)):
            self._body()
            raise HubError(403, "SignatureDoesNotMatch")
        n = int(self.headers.get("Content-Length") or 0)
        f = hub.faults
        if "stall_lfs_after" in f and hub.lfs_uploads_ok >= f["stall_lfs_after"]:
            hub.store.event("lfs_stall", oid=oid)
            while True:            # hang until the client is killed and the socket closes
                if not self.rfile.read(1):
                    self.close_connection = True
                    return
                time.sleep(0.05)
        if "drop_lfs_after" in f and hub.lfs_uploads_ok >= f["drop_lfs_after"]:
            count = f.get("drop_count", -1)
            if count < 0 or hub.lfs_dropped < count:
                hub.lfs_dropped += 1
                hub.store.event("lfs_drop", oid=oid)
                self.rfile.read(min(n, 1024))
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.connection.close()   # RST, no response: a dropped connection
                self.close_connection = True
                return
        tmp = hub.store.blobs / f".upload-{oid}-{secrets.token_hex(4)}"
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            left = n
            while left:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                h.update(chunk)
                out.write(chunk)
                left -= len(chunk)
        if h.hexdigest() != oid or tmp.stat().st_size != size:
            tmp.unlink()
            raise HubError(400, f"uploaded content does not match oid {oid} / size {size}")
        os.replace(tmp, hub.store.blobs / oid)
        with hub.store.lock:
            hub.lfs_uploads_ok += 1
        hub.store.event("lfs_upload", oid=oid, size=size)
        self._send(200, raw=b"", ctype="text/plain")


def serve(root: Path, tokens: dict, port: int = 0, faults: dict | None = None):
    store = Store(root)
    hub = Hub(store, tokens, dict(faults or {}))
    handler = type("BoundHandler", (Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    hub.base = f"http://127.0.0.1:{server.server_address[1]}"
    return server, hub


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tokens", type=Path,
                    help="JSON file: token → {user, role: read|write, orgs: [...]}")
    a = ap.parse_args(argv)
    tokens = json.loads(a.tokens.read_text()) if a.tokens else {}
    faults = json.loads(os.environ.get("CAPSFUS_HUB_FAULTS") or "{}")
    server, hub = serve(a.root, tokens, a.port, faults)
    print(f"READY {hub.base}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
