"""The hub side against a real HTTP stand-in (tests/stand_ins/hub_server.py) with the real `huggingface_hub`
client: downloads pinned to a commit, integrity failures, resume, access errors, rate limits, one-commit publish."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from converters.errors import CkptflowError, CorruptFileError, OutputExistsError
from converters.remote import hub as hub_lib
from converters.remote.download import MANIFEST_NAME, download, partial_dir
from converters.remote.publish import publish
from tests.stand_ins.fixtures import TOKEN, converted, folder_files, hub, hub_env, model_files  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
WANTED = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
}


def resolved_revisions(server) -> set[str]:
    return {p.split("/")[4] for m, p in server.state.requests if "/resolve/" in p}


# -------------------------------------------------------------------------------------------- download


def test_download_resolves_the_branch_to_a_sha_and_takes_only_what_conversion_needs(hub, tmp_path):
    files = model_files()
    sha = hub.state.commit("acme/tiny", files)
    manifest, copied = download("acme/tiny", tmp_path / "out", revision="main")
    assert copied and manifest["revision"] == sha and manifest["source"] == "hf://acme/tiny"
    on_disk = folder_files(tmp_path / "out")
    assert set(on_disk) == WANTED | {MANIFEST_NAME}
    assert all(on_disk[n] == files[n] for n in WANTED)
    assert resolved_revisions(hub) == {sha}  # every file fetched at the commit, never at the moving branch
    assert not any("pytorch_model.bin" in p or ".pth" in p for _, p in hub.state.requests)
    assert {f["verified"] for n, f in manifest["files"].items() if n.endswith(".safetensors")} == {"sha256"}
    assert manifest["files"]["config.json"]["verified"] == "git-oid"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or temp folder left

    hub.state.requests.clear()
    again, copied = download("acme/tiny", tmp_path / "out", revision="main")
    assert not copied and again == manifest
    assert not resolved_revisions(hub)  # nothing fetched again


def fetched_files(server) -> list[str]:
    return sorted(p.split("/", 5)[5] for m, p in server.state.requests if m == "GET" and "/resolve/" in p)


def test_a_split_download_fetches_each_weight_file_once_and_finalize_publishes_the_same_folder(hub, tmp_path):
    """Two parts fetch disjoint runs of the shards (each only its own); finalize takes the small files, checks
    the parts and yields exactly what a one-process download does."""
    sha = hub.state.commit("acme/tiny", model_files())
    whole, _ = download("acme/tiny", tmp_path / "whole")
    out = tmp_path / "split"
    fetched = []
    for i in range(2):
        hub.state.requests.clear()
        record, _ = download("acme/tiny", out, part=(i, 2))
        assert record["part"] == i and record["revision"] == sha
        fetched.append({n for n in fetched_files(hub) if n.endswith(".safetensors")})
        assert set(record["files"]) == fetched[-1]
        assert not out.exists()  # nothing at OUT until finalize
    assert fetched[0] and fetched[1] and not fetched[0] & fetched[1]
    assert fetched[0] | fetched[1] == {n for n in WANTED if n.endswith(".safetensors")}
    hub.state.requests.clear()
    manifest, copied = download("acme/tiny", out, finalize=True)
    assert copied and not any(n.endswith(".safetensors") for n in fetched_files(hub))  # weights not fetched again
    assert manifest["files"] == whole["files"] and manifest["digest"] == whole["digest"]
    assert folder_files(out) == folder_files(tmp_path / "whole")
    assert not partial_dir(out, sha).exists()


def test_a_split_download_finalize_refuses_a_missing_or_damaged_part(hub, tmp_path):
    sha = hub.state.commit("acme/tiny", model_files())
    out = tmp_path / "split"
    download("acme/tiny", out, part=(0, 2))
    with pytest.raises(CkptflowError, match=r"download part\(s\) 1/2 not finished"):
        download("acme/tiny", out, finalize=True)
    record, _ = download("acme/tiny", out, part=(1, 2))
    victim = partial_dir(out, sha) / next(iter(record["files"]))
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CkptflowError, match=r"download part 1/2: .* missing or changed"):
        download("acme/tiny", out, finalize=True)
    assert not out.exists()
    with pytest.raises(CorruptFileError, match="does not match the hub's metadata"):
        download("acme/tiny", out, part=(1, 2))  # re-run: the damaged file fails its check and is deleted ...
    download("acme/tiny", out, part=(1, 2))  # ... and the next run fetches it anew
    manifest, _ = download("acme/tiny", out, finalize=True)
    assert set(manifest["files"]) == WANTED


def test_download_by_sha_gets_that_commit_after_the_branch_moved(hub, tmp_path):
    old = model_files(seed=0)
    sha1 = hub.state.commit("acme/tiny", old)
    sha2 = hub.state.commit("acme/tiny", model_files(seed=1))
    m1, _ = download("acme/tiny", tmp_path / "v1", revision=sha1)
    m2, _ = download("acme/tiny", tmp_path / "v2")  # default: main
    assert (m1["revision"], m2["revision"]) == (sha1, sha2)
    shard = "model-00001-of-00002.safetensors"
    assert (tmp_path / "v1" / shard).read_bytes() == old[shard] != (tmp_path / "v2" / shard).read_bytes()
    with pytest.raises(CkptflowError, match="revision 'nope' not found"):
        download("acme/tiny", tmp_path / "v3", revision="nope")


def test_a_tampered_file_fails_loudly_and_is_fetched_anew_next_time(hub, tmp_path):
    files = model_files()
    sha = hub.state.commit("acme/tiny", files)
    shard = "model-00002-of-00002.safetensors"
    bad = bytearray(files[shard])
    bad[-1] ^= 0xFF  # same size, one bit pattern changed: only the sha256 can tell
    hub.state.tamper[("acme/tiny", shard)] = bytes(bad)
    with pytest.raises(CkptflowError, match=f"{shard} does not match the hub's metadata \\(sha256 "):
        download("acme/tiny", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    staging = partial_dir(tmp_path / "out", sha)
    assert not (staging / shard).exists() and (staging / "model-00001-of-00002.safetensors").exists()

    del hub.state.tamper[("acme/tiny", shard)]
    hub.state.requests.clear()
    manifest, _ = download("acme/tiny", tmp_path / "out")
    assert hub.downloads("acme/tiny") == [shard]  # the good files were kept, only the bad one fetched again
    assert manifest["files"][shard]["sha256"] == __import__("hashlib").sha256(files[shard]).hexdigest()
    assert not staging.exists()


def test_a_killed_download_resumes_with_the_files_already_complete(hub, tmp_path):
    files = model_files()
    files["model-00002-of-00002.safetensors"] = files["model-00002-of-00002.safetensors"] + b"\0" * (2 << 20)
    # (a bigger second shard; the padding after the data is legal safetensors)
    hub.state.commit("acme/tiny", files)
    shard = "model-00002-of-00002.safetensors"
    release = threading.Event()
    hub.state.stall[("acme/tiny", shard)] = (1 << 20, release)  # send 1 MiB of it, then hang
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "converters", "download", "acme/tiny", str(out)],
        cwd=REPO,
        env=hub_env(hub.url, hub.home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while len(set(hub.downloads("acme/tiny")) & WANTED) < len(WANTED) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the other files land and are checked while the shard hangs
        assert proc.poll() is None, proc.stdout.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    release.set()
    del hub.state.stall[("acme/tiny", shard)]
    assert not out.exists()

    hub.state.requests.clear()
    manifest, copied = download("acme/tiny", out)
    assert copied and hub.downloads("acme/tiny") == [shard]
    assert folder_files(out)[shard] == files[shard]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_gated_private_and_missing_repos_get_one_line_explanations(hub, tmp_path, monkeypatch):
    hub.state.commit("acme/gated", model_files(), gated="manual")
    hub.state.commit("acme/secret", model_files(), private=True)
    with pytest.raises(CkptflowError) as err:
        download("acme/gated", tmp_path / "g")
    assert "gated repo: accept its terms at https://huggingface.co/acme/gated" in str(err.value)
    assert "HF_TOKEN" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CkptflowError, match="no token was given: set HF_TOKEN .* `ckptflow_hf`"):
        download("acme/secret", tmp_path / "s")
    with pytest.raises(CkptflowError, match="repository not found"):
        download("acme/none", tmp_path / "n")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    manifest, _ = download("acme/secret", tmp_path / "s")
    assert manifest["revision"]
    hub.state.gate_approved.add(TOKEN)
    download("acme/gated", tmp_path / "g")
    assert f"Bearer {TOKEN}" in hub.state.seen_tokens


def test_the_token_is_never_printed(hub, tmp_path):
    hub.state.commit("acme/secret", model_files(), private=True)
    hub.state.commit("acme/gated", model_files(), gated="auto")
    env = {**hub_env(hub.url, hub.home), "HF_TOKEN": TOKEN}
    outs = []
    for repo in ("acme/secret", "acme/gated", "acme/none"):
        p = subprocess.run(
            [sys.executable, "-m", "converters", "-v", "download", repo, str(tmp_path / repo), "--json"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        outs.append(p.stdout + p.stderr)
    assert f"Bearer {TOKEN}" in hub.state.seen_tokens  # it was used...
    written = "".join(outs) + "".join(
        p.read_text(errors="replace")
        for p in tmp_path.rglob("*")
        if p.is_file() and p.suffix in (".json", ".txt", ".log", "")
    )
    assert TOKEN not in written and TOKEN[3:15] not in written  # ...and never shown
    assert "gated repo" in outs[1]


def test_rate_limits_are_waited_out_not_fatal(hub, tmp_path, caplog):
    hub.state.commit("acme/tiny", model_files())
    hub.state.throttle.update(info=3)
    manifest, _ = download("acme/tiny", tmp_path / "out")
    assert manifest["revision"] and hub.state.throttle["info"] == 0
    assert sum("rate limited (HTTP 429)" in r.message for r in caplog.records) == 3
    hub.state.throttle.update(info=100)
    with pytest.raises(CkptflowError, match="rate limited"):
        hub_lib.snapshot("acme/tiny")


def test_hf_uris_are_parsed_by_prefix_not_by_character_set():
    assert "hf://facebook/opt".lstrip("hf://") == "acebook/opt"  # MaxText's bug, for the record
    assert hub_lib.parse_hf_uri("hf://facebook/opt") == ("facebook/opt", None)
    assert hub_lib.parse_hf_uri("hf://hf-internal/hub.model@v1.0") == ("hf-internal/hub.model", "v1.0")
    for bad in ("hf://opt", "hf://a/b/c", "hf://-x/y", "hf://a--b/c", "gs://a/b"):
        with pytest.raises(CkptflowError):
            hub_lib.parse_hf_uri(bad)


# --------------------------------------------------------------------------------------------- publish


def test_the_manifest_carries_the_source_lineage(converted):
    mt, sha = converted
    m = json.loads((mt / "ckptflow-manifest.json").read_text())
    src = m["source"]
    assert src["repo"] == "meta-llama/Tiny-3.1" and src["revision"] == sha and src["uri"] == "hf://meta-llama/Tiny-3.1"
    assert set(src["files"]) >= {"config.json", "model.safetensors"} and all(
        len(f["sha256"]) == 64 for f in src["files"].values()
    )
    assert m["output_digest"].startswith("sha256:") and m["family"] == "llama3.1"
    assert all(len(o["blake3"]) == 64 for o in m["outputs"].values())


def test_publish_to_the_hub_is_one_private_commit_with_a_model_card(hub, converted, tmp_path, monkeypatch):
    mt, sha = converted
    src = shutil.copytree(mt, tmp_path / "mt")
    report = tmp_path / "verify.json"
    report.write_text(
        json.dumps(
            {"max_kl": 0.015, "dtype": "float32", "summary": {"passed": True, "kl_max": 1.5e-7, "num_tokens": 520}}
        )
    )
    with pytest.raises(CkptflowError, match="refused access|Invalid credentials|write access"):
        publish(src, "hf://facebook/opt")  # no token
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    receipt = publish(src, "hf://facebook/opt", verify_report=report)
    assert receipt["status"] == "published" and receipt["destination"] == "hf://facebook/opt"
    repo = hub.state.repos["facebook/opt"]  # not "acebook/opt"
    assert repo.private and repo.refs["main"] == receipt["commit"]
    assert len(repo.commits) == 2  # the repo's initial commit + ONE with everything
    tree = repo.resolve("main").files
    assert set(tree) == set(folder_files(src)) | {"README.md", ".gitattributes"}
    card = tree["README.md"].decode()
    assert "base_model: meta-llama/Tiny-3.1" in card and sha in card and "**passed**" in card and "1.5e-07" in card
    assert json.loads(tree["ckptflow-manifest.json"])["verify"]["kl_max"] == 1.5e-7

    again = publish(src, "hf://facebook/opt")
    assert again["status"] == "unchanged" and len(repo.commits) == 2

    other = shutil.copytree(mt, tmp_path / "other")
    m = json.loads((other / "ckptflow-manifest.json").read_text())
    m["output_digest"] = "sha256:" + "0" * 64
    (other / "ckptflow-manifest.json").write_text(json.dumps(m))
    with pytest.raises(OutputExistsError, match="different version.*--force"):
        publish(other, "hf://facebook/opt")
    assert publish(other, "hf://facebook/opt", force=True)["status"] == "replaced"
    assert len(repo.commits) == 3

    publish(src, "hf://acme/public-one", public=True)
    assert hub.state.repos["acme/public-one"].private is False
