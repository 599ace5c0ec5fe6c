"""The local Hub server (tests/hub_server.py) against the real huggingface_hub client and the
real ``datasets.load_dataset`` (fresh processes with HF_ENDPOINT pointing at it)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest_hub import OTHER_TOKEN, READ_TOKEN, WRITE_TOKEN

CARD = ("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        "    path: data/train-*\nlicense: cc-by-4.0\n---\n# test dataset\n")


def make_rows(n: int, seed: str = "") -> list[dict]:
    return [{"id": f"{seed}r{i}", "fused": f"caption {i} {seed} é 🌊" * (1 + i % 3),
             "punsafe": (i % 7) / 7, "n": i} for i in range(n)]


def make_export(folder: Path, rows: list[dict], shards: int = 2) -> Path:
    """An HF dataset folder like `capsfus export` writes: README.md + data/train-*.parquet."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    for s in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[s * per:(s + 1) * per]),
                       folder / "data" / f"train-{s:05d}-of-{shards:05d}.parquet",
                       compression="zstd", row_group_size=300)
    (folder / "README.md").write_text(CARD)
    return folder


def load_back(hub, repo_id: str, revision: str | None = None, token=WRITE_TOKEN,
              also: tuple = ()) -> dict:
    """Every row through load_dataset (downloaded) and load_dataset(streaming=True), in a
    fresh process; ``also``: more (repo_id, revision) pairs read in the same process."""
    targets = [(repo_id, revision), *also]
    got = hub.python(f"""
        import json, datasets
        out = []
        for repo, rev in {targets!r}:
            kw = dict(split="train", revision=rev)
            ds = datasets.load_dataset(repo, **kw)
            st = datasets.load_dataset(repo, streaming=True, **kw)
            out.append({{"rows": ds.to_list(), "stream": list(st)}})
        print(json.dumps(out))
    """, token=token)
    return got[0] if not also else got


def http_get(url: str, headers: dict | None = None):
    """(status, headers, body) with plain urllib: no client library in the way."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                    timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_create_upload_tree_download(hub, tmp_path):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError
    api = hub.api()
    repo = hub.repo_id()
    url = api.create_repo(repo, repo_type="dataset")
    assert url.endswith(f"/datasets/{repo}")
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo(repo, repo_type="dataset")            # exists: 409
    assert e.value.response.status_code == 409
    api.create_repo(repo, repo_type="dataset", exist_ok=True)
    folder = make_export(tmp_path / "exp", make_rows(500), shards=3)
    info = api.upload_folder(folder_path=folder, repo_id=repo, repo_type="dataset")
    files = sorted(f.path for f in api.list_repo_tree(repo, repo_type="dataset", recursive=True))
    assert files == [".gitattributes", "README.md", "data"] + [
        f"data/train-{i:05d}-of-00003.parquet" for i in range(3)]
    # parquet went through git-LFS (batch + signed PUT + verify), the card as a regular file
    lfs = hub.events("lfs_upload")
    local = {p.name: p.read_bytes() for p in (folder / "data").iterdir()}
    import hashlib
    assert {hashlib.sha256(b).hexdigest() for b in local.values()} <= {e["oid"] for e in lfs}
    entries = {e.path: e for e in api.get_paths_info(repo, ["README.md", "data",
                                                            "data/train-00001-of-00003.parquet",
                                                            "missing.txt"],
                                                     repo_type="dataset", expand=True)}
    assert set(entries) == {"README.md", "data", "data/train-00001-of-00003.parquet"}
    pf = entries["data/train-00001-of-00003.parquet"]
    assert pf.lfs.sha256 == hashlib.sha256(local["train-00001-of-00003.parquet"]).hexdigest()
    assert pf.last_commit.oid == info.oid and entries["README.md"].lfs is None
    # resolve: bytes, ETag, X-Repo-Commit, size
    for name, data in local.items():
        got = api.hf_hub_download(repo, f"data/{name}", repo_type="dataset",
                                  cache_dir=tmp_path / "cache")
        assert Path(got).read_bytes() == data
    meta = get_hf_file_metadata(hf_hub_url(repo, "README.md", repo_type="dataset",
                                           endpoint=hub.url), token=WRITE_TOKEN)
    assert meta.commit_hash == info.oid and meta.size == len(CARD.encode())
    assert meta.etag == api.get_paths_info(repo, ["README.md"], repo_type="dataset")[0].blob_id
    with pytest.raises(RemoteEntryNotFoundError):
        api.hf_hub_download(repo, "nope.txt", repo_type="dataset", cache_dir=tmp_path / "c2")
    # a no-op re-upload makes no commit and sends nothing
    n_lfs = len(hub.events("lfs_upload"))
    again = api.upload_folder(folder_path=folder, repo_id=repo, repo_type="dataset")
    assert again.oid == info.oid and len(hub.events("lfs_upload")) == n_lfs


def test_range_reads_and_pagination(hub, tmp_path):
    api = hub.api()
    repo = hub.repo_id(stem="many")
    api.create_repo(repo)   # a model repo this time
    d = tmp_path / "many"
    (d / "sub").mkdir(parents=True)
    for i in range(120):    # more than one tree page (PAGE_SIZE 50)
        (d / "sub" / f"f{i:03d}.txt").write_text(f"file {i}\n" * (i + 1))
    api.upload_folder(folder_path=d, repo_id=repo)
    listed = [f.path for f in api.list_repo_tree(repo, recursive=True)]
    assert len(listed) == len(set(listed)) == 122           # .gitattributes, sub, 120 files
    top = [f.path for f in api.list_repo_tree(repo)]
    assert sorted(top) == [".gitattributes", "sub"]
    body = (d / "sub" / "f100.txt").read_bytes()
    status, headers, got = http_get(f"{hub.url}/{repo}/resolve/main/sub/f100.txt",
                                    {"Range": "bytes=10-29",
                                     "Authorization": f"Bearer {WRITE_TOKEN}"})
    assert status == 206 and got == body[10:30]
    assert headers["Content-Range"] == f"bytes 10-29/{len(body)}"
    status, headers, got = http_get(f"{hub.url}/{repo}/resolve/main/sub/f100.txt",
                                    {"Range": "bytes=-5"})
    assert status == 206 and got == body[-5:]
    status, headers, got = http_get(f"{hub.url}/{repo}/resolve/main/sub/f100.txt")
    assert status == 200 and got == body and headers["X-Repo-Commit"]


def test_branch_revision(hub, tmp_path):
    api = hub.api()
    repo = hub.repo_id(stem="rev")
    api.create_repo(repo, repo_type="dataset")
    v1 = make_export(tmp_path / "v1", make_rows(40, "a"), shards=1)
    api.upload_folder(folder_path=v1, repo_id=repo, repo_type="dataset")
    api.create_branch(repo, branch="v2", repo_type="dataset")
    v2 = make_export(tmp_path / "v2", make_rows(60, "b"), shards=1)
    api.upload_folder(folder_path=v2, repo_id=repo, repo_type="dataset", revision="v2")
    refs = api.list_repo_refs(repo, repo_type="dataset")
    assert {b.name for b in refs.branches} == {"main", "v2"}
    v2_rows, main_rows = load_back(hub, repo, revision="v2", also=[(repo, None)])
    assert v2_rows["rows"] == v2_rows["stream"] == make_rows(60, "b")
    assert main_rows["rows"] == main_rows["stream"] == make_rows(40, "a")
    from huggingface_hub.errors import RevisionNotFoundError
    with pytest.raises(RevisionNotFoundError):
        list(api.list_repo_tree(repo, repo_type="dataset", revision="nope"))


def test_private_repo_and_tokens(hub, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    api = hub.api()
    repo = hub.repo_id(stem="private")
    api.create_repo(repo, repo_type="dataset", private=True)
    assert api.repo_info(repo, repo_type="dataset").private
    folder = make_export(tmp_path / "p", make_rows(10), shards=1)
    api.upload_folder(folder_path=folder, repo_id=repo, repo_type="dataset")
    for token in (None, OTHER_TOKEN):          # anonymous (401) and another user (404)
        with pytest.raises(RepositoryNotFoundError):
            list(hub.api(token).list_repo_tree(repo, repo_type="dataset"))
    assert len(list(hub.api(READ_TOKEN).list_repo_tree(repo, repo_type="dataset"))) == 3
    with pytest.raises(HfHubHTTPError) as e:     # a read token cannot write
        hub.api(READ_TOKEN).upload_folder(folder_path=folder, repo_id=repo, repo_type="dataset",
                                          commit_message="x", allow_patterns=["README.md"])
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:     # bob cannot create under capsorg
        hub.api(OTHER_TOKEN).create_repo("capsorg/bobs", repo_type="dataset")
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:     # an unknown token: 401 everywhere
        hub.api("hf_notAToken").whoami()
    assert e.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as e:
        hub.api(None).create_repo("capsorg/anon", repo_type="dataset")
    assert e.value.response.status_code == 401
    assert hub.api(READ_TOKEN).whoami()["auth"]["accessToken"]["role"] == "read"
    # the real load_dataset: refused without a token, every row with one
    with pytest.raises(AssertionError, match="DatasetNotFoundError|not found|doesn't exist"):
        load_back(hub, repo, token=None)
    assert load_back(hub, repo, token=READ_TOKEN)["rows"] == make_rows(10)


def test_load_dataset_round_trip_every_row(hub, tmp_path):
    api = hub.api()
    repo = hub.repo_id(stem="rt")
    api.create_repo(repo, repo_type="dataset")
    rows = make_rows(3001)
    api.upload_folder(folder_path=make_export(tmp_path / "rt", rows, shards=3), repo_id=repo,
                      repo_type="dataset")
    got = load_back(hub, repo)
    assert got["rows"] == rows                   # every row, every column, in order
    assert got["stream"] == rows
    assert Counter(r["id"] for r in got["rows"]) == Counter(r["id"] for r in rows)


def test_dropped_connection_is_retried(hub, tmp_path):
    """The server resets the connection of one LFS upload: the client retries it and the
    repo still holds every byte."""
    api = hub.api()
    repo = hub.repo_id(stem="drop")
    api.create_repo(repo, repo_type="dataset")
    hub.faults(drop_lfs_after=0, drop_count=1)
    rows = make_rows(200)
    api.upload_folder(folder_path=make_export(tmp_path / "d", rows, shards=2), repo_id=repo,
                      repo_type="dataset")
    assert len(hub.events("lfs_drop")) >= 1
    assert load_back(hub, repo)["rows"] == rows


def test_xet_is_refused_with_a_message(hub):
    status, headers, _ = http_get(f"{hub.url}/api/datasets/capsorg/x/xet-write-token/main",
                                  {"Authorization": f"Bearer {WRITE_TOKEN}"})
    assert status == 400 and "HF_HUB_DISABLE_XET" in headers["X-Error-Message"]


def test_storage_is_content_addressed(hub, tmp_path):
    import hashlib
    api = hub.api()
    repo = hub.repo_id(stem="cas")
    api.create_repo(repo, repo_type="dataset")
    api.upload_folder(folder_path=make_export(tmp_path / "c", make_rows(50), shards=2),
                      repo_id=repo, repo_type="dataset")
    store = hub.root / "store"
    for blob in (store / "blobs").iterdir():
        if not blob.name.startswith("."):
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    repos = list((store / "repos").rglob("repo.json"))
    assert repos
    for r in repos:
        meta = json.loads(r.read_text())
        for oid in meta["branches"].values():
            commit = json.loads((r.parent / "commits" / f"{oid}.json").read_text())
            for entry in commit["files"].values():
                assert (store / "blobs" / entry["sha256"]).stat().st_size == entry["size"]
