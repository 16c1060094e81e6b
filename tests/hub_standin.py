"""A loopback stand-in for the Hugging Face Hub (no real Hub is reachable from the tests).

It answers the endpoints ``huggingface_hub`` uses to download and upload, the way the Hub does:

- ``HEAD``/``GET {endpoint}/[datasets/]{repo}/resolve/{revision}/{path}`` (with ``Range``): the file
  endpoint. Dataset repos hold the files a test ``put`` at one fixed commit on every revision; model
  repos hold what uploads committed, per branch.
- ``POST /api/repos/create``, ``GET /api/models/{repo}[/revision/{revision}]`` (repo and revision info;
  the client asks for it when a create is refused),
  ``POST /api/validate-yaml`` (a README's metadata block), ``POST /api/models/{repo}/preupload/{revision}``
  (answers ``regular`` for every file: no LFS or Xet transfer, so tests set ``HF_HUB_DISABLE_XET=1``),
  ``POST /api/models/{repo}/commit/{revision}`` (the NDJSON commit) and
  ``POST /api/models/{repo}/branch/{branch}`` (branch creation), and ``GET /api/agent-harnesses`` (the
  client's telemetry registry, answered empty).

Writes need ``Authorization: Bearer <token>`` when ``Hub.token`` is set, and are refused with 403 when
``Hub.read_only`` is. Every request is logged in ``Hub.requests``; anything else is a 404 logged in
``Hub.unknown``, so a client that starts using another endpoint fails loudly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants
import pytest
from conftest import loopback_server

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # every dataset file's commit


@dataclass
class ModelRepo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: bytes}

    def commit(self, branch: str, tree: dict[str, bytes], summary: str) -> str:
        parent = self.branches.get(branch, "")
        h = hashlib.sha1(f"{parent}\n{summary}\n".encode())
        for path in sorted(tree):
            h.update(path.encode() + b"\0" + hashlib.sha1(tree[path]).digest())
        sha = h.hexdigest()
        self.commits[sha] = dict(tree)
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass
class Hub:
    endpoint: str = ""
    files: dict[tuple[str, str], bytes] = field(default_factory=dict)  # dataset repos: (repo, path) -> body
    models: dict[str, ModelRepo] = field(default_factory=dict)  # model repos by id
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range
    unknown: list[tuple[str, str]] = field(default_factory=list)  # requests no endpoint here answers
    cut_next_get: int | None = None  # send only this many bytes of the next GET body, then hang up
    token: str | None = None  # writes need this bearer token when set
    read_only: bool = False  # refuse every write (403), as the Hub does for a read-only token

    def put(self, repo: str, path: str, body: bytes) -> None:
        """A file of dataset repo ``repo``."""
        self.files[repo, path] = body

    def tree(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """A model repo's files at ``revision``."""
        repo = self.models[repo_id]
        return repo.commits[repo.resolve(revision)]

    def edit(self, repo_id: str, path: str, body: bytes, branch: str = "main") -> str:
        """Commit a changed file straight on the Hub (its web editor), as someone else might."""
        repo = self.models[repo_id]
        return repo.commit(branch, {**self.tree(repo_id, branch), path: body}, f"edit {path}")


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    resolve = re.compile(r"/(?P<datasets>datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
    api = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<what>revision|preupload|commit|branch)/(?P<rev>.+)")
    info = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(?P<what>)(?P<rev>)")  # repo info: the main branch

    class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: the connection closes after each response
        def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                   head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and not head:
                self.wfile.write(body)

        def _json(self, status: int, obj: object, code: str | None = None) -> None:
            headers = {"Content-Type": "application/json"}
            if code:
                headers["X-Error-Code"] = code
            self._reply(status, json.dumps(obj).encode(), headers)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _may_write(self) -> bool:
            if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._json(401, {"error": "Invalid credentials in Authorization header"})
                return False
            if hub.read_only:
                self._json(403, {"error": "You don't have the rights to create a model under this namespace"})
                return False
            return True

        # ---- the file endpoint ------------------------------------------------------------
        def _serve(self, head: bool) -> None:
            rng = self.headers.get("Range")
            path = urlsplit(self.path).path
            hub.requests.append((self.command, path, rng))
            m = resolve.fullmatch(path)
            if m is None:
                return self._unknown()
            rev, name = unquote(m["rev"]), unquote(m["path"])
            if m["datasets"]:
                body, commit = hub.files.get((m["repo"], name)), COMMIT
            else:
                repo = hub.models.get(m["repo"])
                if repo is None:
                    return self._reply(401, headers={"X-Error-Code": "RepoNotFound"}, head=head)
                commit = repo.resolve(rev)
                if commit is None:
                    return self._reply(404, headers={"X-Error-Code": "RevisionNotFound"}, head=head)
                body = repo.commits[commit].get(name)
            if body is None:
                return self._reply(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, head=head)
            start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1]) if rng else 0
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("ETag", f'"{hashlib.sha1(body).hexdigest()}"')
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if head:
                return
            payload = body[start:]
            if hub.cut_next_get is not None:
                payload, hub.cut_next_get = payload[: hub.cut_next_get], None
            self.wfile.write(payload)

        def do_HEAD(self):
            self._serve(head=True)

        def do_GET(self):
            path = urlsplit(self.path).path
            if path == "/api/agent-harnesses":  # the client's telemetry registry (not logged: no file is read)
                return self._json(200, {"standardEnvVars": [], "harnesses": {}})
            m = api.fullmatch(path) or info.fullmatch(path)
            if m is None or m["what"] not in ("revision", ""):
                return self._serve(head=False)
            hub.requests.append((self.command, path, None))
            repo = hub.models.get(m["repo"])
            commit = repo.resolve(unquote(m["rev"] or "main")) if repo else None
            if commit is None:
                code = "RepoNotFound" if repo is None else "RevisionNotFound"
                return self._json(401 if repo is None else 404, {"error": code}, code)
            self._json(200, {"id": m["repo"], "sha": commit, "private": repo.private,
                             "siblings": [{"rfilename": p} for p in sorted(repo.commits[commit])]})

        # ---- the API ----------------------------------------------------------------------
        def do_POST(self):
            path = urlsplit(self.path).path
            hub.requests.append((self.command, path, None))
            body = self._body()
            if path == "/api/validate-yaml":
                return self._json(200, {})
            if not self._may_write():
                return None
            if path == "/api/repos/create":
                req = json.loads(body)
                repo_id = f"{req['organization']}/{req['name']}"
                if repo_id in hub.models:
                    return self._json(409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"})
                repo = hub.models[repo_id] = ModelRepo(private=req.get("visibility") == "private")
                repo.commit("main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial commit")
                return self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
            m = api.fullmatch(path)
            repo = hub.models.get(m["repo"]) if m else None
            if m is None:
                return self._unknown()
            if repo is None:
                return self._json(404, {"error": "Repository not found"}, "RepoNotFound")
            rev = unquote(m["rev"])
            if m["what"] == "preupload":
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            if m["what"] == "branch":
                if rev in repo.branches:
                    return self._json(409, {"error": "Reference already exists"})
                start = (json.loads(body) if body else {}).get("startingPoint") or "main"
                repo.branches[rev] = repo.resolve(start)
                return self._json(200, {})
            if m["what"] == "commit":
                if rev not in repo.branches:
                    return self._json(404, {"error": f"Invalid rev id: {rev}"}, "RevisionNotFound")
                tree, summary = dict(repo.commits[repo.branches[rev]]), ""
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        summary = item["value"]["summary"]
                    elif item["key"] == "file":
                        tree[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        tree.pop(item["value"]["path"], None)
                    else:  # lfsFile and the rest: never asked for, since preupload says "regular"
                        return self._json(400, {"error": f"unexpected commit operation {item['key']}"})
                sha = repo.commit(rev, tree, summary)
                return self._json(200, {"commitUrl": f"{hub.endpoint}/{m['repo']}/commit/{sha}", "commitOid": sha})
            return self._unknown()

        def _unknown(self) -> None:
            hub.unknown.append((self.command, self.path))
            self._json(404, {"error": f"the stand-in Hub does not answer {self.command} {self.path}"})

        def log_message(self, *args):
            pass

    return Handler


@contextmanager
def serve_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Iterator[Hub]:
    """Serve a fresh :class:`Hub` on 127.0.0.1 and point huggingface_hub (and timm, which calls it
    without an endpoint) at it, with a fresh cache and no token from the user's login."""
    state = Hub()
    with loopback_server(_handler(state)) as state.endpoint:
        c = huggingface_hub.constants
        monkeypatch.setenv("HF_ENDPOINT", state.endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_TOKEN_PATH", str(cache / "no-token"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)  # the suite runs offline
        monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(c, "ENDPOINT", state.endpoint)
        monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", state.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(c, "HF_TOKEN_PATH", str(cache / "no-token"))
        monkeypatch.setattr(c, "AGENT_HARNESSES_PATH", str(cache / "agent-harnesses.json"))
        yield state
