"""Tests for tests/fake_hub.py: the real huggingface_hub client against the in-process fake Hub.

Nothing here talks to huggingface.co (unreachable from the test machines): every request goes to a
FakeHub on 127.0.0.1, and the client side is the unmodified huggingface_hub library.
"""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub, git_blob_sha1
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

REPO = "fake-user/tiny-adapter"
CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token="fake-token")


@pytest.fixture
def adapter_dir(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG, indent=2))
    (folder / "adapter_model.bin").write_bytes(random.Random(0).randbytes(300_000))
    return folder


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _push(api, folder, message="Upload adapter", **kwargs):
    api.create_repo(REPO, exist_ok=True, **kwargs)
    return api.upload_folder(repo_id=REPO, folder_path=folder, commit_message=message)


def test_upload_folder_stores_exact_bytes(hub, api, adapter_dir):
    url = api.create_repo(REPO, exist_ok=True, private=True)
    assert url.repo_id == REPO and url.endpoint == hub.url
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO  # exists: 409 + exist_ok
    info = api.upload_folder(repo_id=REPO, folder_path=adapter_dir, commit_message="Upload adapter")

    assert hub.repos == {REPO: _files(adapter_dir)}
    assert len(hub.repos[REPO]["adapter_model.bin"]) == 300_000
    assert hub.is_private(REPO)
    initial, commit = hub.commits(REPO)
    assert re.fullmatch(r"[0-9a-f]{40}", commit.oid)
    assert info.oid == commit.oid == hub.head(REPO, "main")
    assert commit.parent == initial.oid and initial.files == {}
    assert commit.message == "Upload adapter"
    assert sorted(commit.added) == ["adapter_config.json", "adapter_model.bin"]
    # small files travel base64-encoded inside the commit: no LFS/Xet upload at all
    assert hub.requests == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/repos/create"),
        ("POST", f"/api/models/{REPO}/preupload/main"),
        ("POST", f"/api/models/{REPO}/commit/main"),
    ]
    assert all(h.get("authorization") == "Bearer fake-token" for *_, h in hub.request_log)


def test_download_then_offline_from_cache_in_process(hub, api, adapter_dir, tmp_path, monkeypatch):
    _push(api, adapter_dir)
    cache = tmp_path / "cache"
    expected = _files(adapter_dir)

    path = hf_hub_download(REPO, "adapter_model.bin", revision=None, endpoint=hub.url, cache_dir=cache)
    assert Path(path).read_bytes() == expected["adapter_model.bin"]
    assert Path(path).is_relative_to(cache) and hub.head(REPO) in Path(path).parts
    assert ("GET", f"/{REPO}/resolve/main/adapter_model.bin") in hub.requests

    # online again: one HEAD (metadata check), no new GET: the file comes from the cache
    before = len(hub.requests)
    assert hf_hub_download(REPO, "adapter_model.bin", endpoint=hub.url, cache_dir=cache) == path
    assert hub.requests[before:] == [("HEAD", f"/{REPO}/resolve/main/adapter_model.bin")]

    # offline: the library checks constants.HF_HUB_OFFLINE on every request => patching it works
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.requests)
    assert hf_hub_download(REPO, "adapter_model.bin", endpoint=hub.url, cache_dir=cache) == path
    with pytest.raises(LocalEntryNotFoundError):  # never downloaded => not in the cache
        hf_hub_download(REPO, "adapter_config.json", endpoint=hub.url, cache_dir=cache)
    assert len(hub.requests) == before


def test_setting_env_var_after_import_does_not_switch_offline(hub, api, adapter_dir, tmp_path, monkeypatch):
    """Pitfall: HF_HUB_OFFLINE is read at import time; setting it later in os.environ does nothing."""
    _push(api, adapter_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.requests)
    hf_hub_download(REPO, "adapter_config.json", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert len(hub.requests) > before


def test_offline_in_subprocess_reads_shared_cache(hub, api, adapter_dir, tmp_path):
    _push(api, adapter_dir)
    cache = tmp_path / "cache"
    online = hf_hub_download(REPO, "adapter_config.json", endpoint=hub.url, cache_dir=cache)

    before = len(hub.requests)
    script = (
        "import sys; from huggingface_hub import constants, hf_hub_download\n"
        "assert constants.HF_HUB_OFFLINE\n"
        f"print(hf_hub_download({REPO!r}, 'adapter_config.json', endpoint=sys.argv[1]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1"}
    out = subprocess.run([sys.executable, "-c", script, hub.url], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    offline = out.stdout.strip().splitlines()[-1]
    assert offline == online
    assert json.loads(Path(offline).read_text()) == CONFIG
    assert len(hub.requests) == before


def test_second_commit_and_download_of_main(hub, api, adapter_dir, tmp_path):
    first = _push(api, adapter_dir, "v1")
    cache = tmp_path / "cache"
    old = hf_hub_download(REPO, "adapter_config.json", endpoint=hub.url, cache_dir=cache)

    new_config = {**CONFIG, "r": 16}
    (adapter_dir / "adapter_config.json").write_text(json.dumps(new_config))
    second = api.upload_folder(repo_id=REPO, folder_path=adapter_dir, commit_message="v2")

    assert second.oid != first.oid and second.oid == hub.head(REPO)
    commit = hub.commits(REPO)[-1]
    assert commit.parent == first.oid and commit.message == "v2"
    assert commit.added == ["adapter_config.json"]  # the client skipped the unchanged binary (preupload oid)
    assert hub.repos[REPO] == _files(adapter_dir)

    new = hf_hub_download(REPO, "adapter_config.json", revision="main", endpoint=hub.url, cache_dir=cache)
    assert new != old and second.oid in Path(new).parts
    assert json.loads(Path(new).read_text()) == new_config
    assert (cache / f"models--{REPO.replace('/', '--')}" / "refs" / "main").read_text() == second.oid
    # the old commit stays reachable by sha
    by_sha = hf_hub_download(
        REPO, "adapter_config.json", revision=first.oid, endpoint=hub.url, cache_dir=tmp_path / "other-cache"
    )
    assert json.loads(Path(by_sha).read_text()) == CONFIG

    # nothing changed => no commit, the client answers with the current head
    assert api.upload_folder(repo_id=REPO, folder_path=adapter_dir, commit_message="v3").oid == second.oid
    assert len(hub.commits(REPO)) == 3


def test_listing_snapshot_and_errors(hub, api, adapter_dir, tmp_path, monkeypatch):
    (adapter_dir / "sub").mkdir()
    (adapter_dir / "sub" / "notes.txt").write_text("hello")
    _push(api, adapter_dir)

    assert sorted(api.list_repo_files(REPO)) == ["adapter_config.json", "adapter_model.bin", "sub/notes.txt"]
    assert api.file_exists(REPO, "sub/notes.txt") and not api.file_exists(REPO, "missing.txt")
    assert api.model_info(REPO).sha == hub.head(REPO)
    entry = next(f for f in api.list_repo_tree(REPO) if f.path == "adapter_config.json")
    assert entry.blob_id == git_blob_sha1(hub.repos[REPO]["adapter_config.json"])

    cache = tmp_path / "cache"
    snap = Path(snapshot_download(REPO, endpoint=hub.url, cache_dir=cache))
    assert snap.name == hub.head(REPO) and _files(snap) == _files(adapter_dir)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.requests)
    assert Path(snapshot_download(REPO, endpoint=hub.url, cache_dir=cache)) == snap
    assert len(hub.requests) == before
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.txt", endpoint=hub.url, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "adapter_config.json", revision="v9", endpoint=hub.url, cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("fake-user/nope", "adapter_config.json", endpoint=hub.url, cache_dir=cache)


def test_private_repo_needs_a_token(hub, api, adapter_dir, tmp_path):
    _push(api, adapter_dir, private=True)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "adapter_config.json", endpoint=hub.url, cache_dir=tmp_path, token=False)
    path = hf_hub_download(REPO, "adapter_config.json", endpoint=hub.url, cache_dir=tmp_path, token="fake-token")
    assert json.loads(Path(path).read_text()) == CONFIG


@pytest.mark.filterwarnings("ignore:Use .content=<...>. to upload raw bytes:DeprecationWarning")
def test_lfs_upload_flow_without_xet(monkeypatch, adapter_dir, tmp_path):
    """With Xet disabled, files the server marks "lfs" go through the LFS batch API + PUT."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub(lfs_threshold=100_000) as hub:
        api = HfApi(endpoint=hub.url, token="fake-token")
        _push(api, adapter_dir)
        assert hub.repos[REPO] == _files(adapter_dir)
        methods = [m for m, p in hub.requests if p.startswith(f"/{REPO}.git/info/lfs") or p.startswith("/_fake_lfs")]
        assert methods == ["POST", "PUT"]
        entry = next(f for f in api.list_repo_tree(REPO) if f.path == "adapter_model.bin")
        assert entry.lfs is not None and entry.lfs.size == 300_000
        path = hf_hub_download(REPO, "adapter_model.bin", endpoint=hub.url, cache_dir=tmp_path / "cache")
        assert Path(path).read_bytes() == hub.repos[REPO]["adapter_model.bin"]
        assert Path(path).resolve().name == entry.lfs.sha256  # blob named after the sha256 ETag


def test_transformers_push_to_hub_and_from_pretrained(hub, tmp_path, monkeypatch):
    """transformers takes no endpoint argument: as_default_endpoint() points it at the fake Hub."""
    from transformers import AutoConfig, GPT2Config

    cache = tmp_path / "cache"
    with hub.as_default_endpoint():
        GPT2Config(n_layer=2, n_embd=64).push_to_hub(REPO, token="fake-token", commit_message="config")
        assert sorted(hub.repos[REPO]) == ["README.md", "config.json"]
        assert AutoConfig.from_pretrained(REPO, cache_dir=cache).n_embd == 64

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # transformers asks huggingface_hub too
        before = len(hub.requests)
        assert AutoConfig.from_pretrained(REPO, cache_dir=cache).n_layer == 2
        assert len(hub.requests) == before
    assert constants.ENDPOINT != hub.url  # restored


def test_seeding_range_and_stale_parent_commit(hub, api, adapter_dir, tmp_path):
    hub.create_repo(REPO)
    sha = hub.commit(REPO, {"adapter_config.json": b'{"r": 4}', "a/b.txt": b"0123456789"}, message="seed")
    assert hub.head(REPO) == sha and hub.commits(REPO)[-1].message == "seed"
    path = hf_hub_download(REPO, "a/b.txt", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == b"0123456789"

    import httpx2  # the HTTP client huggingface_hub 2.4 uses

    r = httpx2.get(f"{hub.url}/{REPO}/resolve/main/a/b.txt", headers={"Range": "bytes=2-4"})
    assert r.status_code == 206 and r.content == b"234" and r.headers["Content-Range"] == "bytes 2-4/10"

    with pytest.raises(HfHubHTTPError) as err:  # someone committed since `parent_commit`
        api.upload_folder(
            repo_id=REPO, folder_path=adapter_dir, commit_message="late", parent_commit=hub.commits(REPO)[0].oid
        )
    assert err.value.response.status_code == 412
    assert hub.head(REPO) == sha
