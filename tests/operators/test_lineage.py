"""Asset URIs, extras and OpenLineage naming (no Airflow run)."""

from __future__ import annotations

from operators import lineage
from operators.commands import RunSpec

SHA = "0123456789abcdef0123456789abcdef01234567"


def test_source_and_destination_uris():
    hub = RunSpec(source="acme/tiny", revision="main", destination="file:///m/v1")
    assert lineage.source_uri(hub) == "hf://acme/tiny@main"
    assert lineage.source_uri(hub, SHA) == f"hf://acme/tiny@{SHA}"
    local = RunSpec(source="/data/my model", destination="/m/v1")
    assert lineage.source_uri(local) == "file:///data/my%20model"
    assert lineage.destination_uri(local) == "file:///m/v1"
    assert lineage.destination_uri(hub) == "file:///m/v1"


def test_step_inlets_and_outlets_chain():
    uris = {k: k for k in ("source", "staged", "converted", "report", "destination")}
    assert lineage.step_uris("download", uris) == (["source"], ["staged"])
    assert lineage.step_uris("convert", uris) == (["staged"], ["converted"])
    assert lineage.step_uris("verify", uris) == (["staged", "converted"], ["report"])
    assert lineage.step_uris("publish", uris) == (["converted", "report"], ["destination"])
    assert lineage.step_uris("finalize", uris) == ([], [])  # one part: nothing to assemble
    assert lineage.step_uris("download_finalize", uris) == ([], [])


def test_in_parts_the_converted_checkpoint_is_finalizes_output():
    uris = {k: k for k in ("source", "staged", "converted", "report", "destination")}
    assert lineage.step_uris("convert", uris, parts=4) == (["staged"], [])  # a part's share is no asset
    assert lineage.step_uris("finalize", uris, parts=4) == (["staged"], ["converted"])
    assert lineage.alias_name("finalize") == lineage.alias_name("convert") == "ckptflow-convert"
    spec = RunSpec(source="acme/tiny", destination="file:///m/v1", parts=4)
    earlier = {"convert": {"family": "qwen3", "outputs": {"a": {"bytes": 1, "sha256": "00" * 32}}}}
    part = lineage.extras("convert", spec, earlier)
    assert part["parts"] == 4 and "output_digest" not in part and "family" not in part  # not the part's output
    assert lineage.extras("finalize", spec, earlier)["output_digest"].startswith("sha256:")
    assert "parts" not in lineage.extras("convert", RunSpec(source="acme/tiny", destination="file:///m/v1"), earlier)


def test_in_parts_the_staged_source_is_the_download_finalizes_output():
    uris = {k: k for k in ("source", "staged", "converted", "report", "destination")}
    assert lineage.step_uris("download", uris, parts=4) == (["source"], [])  # a part's files are no asset
    assert lineage.step_uris("download_finalize", uris, parts=4) == (["source"], ["staged"])
    assert lineage.alias_name("download_finalize") == lineage.alias_name("download") == "ckptflow-download"
    spec = RunSpec(source="acme/tiny", destination="file:///m/v1", parts=4)
    earlier = {"download": {"revision": SHA, "digest": "sha256:old"}}  # an earlier try's staged source
    part = lineage.extras("download", spec, earlier)
    assert part["parts"] == 4 and "source_revision_sha" not in part and "source_digest" not in part
    done = lineage.extras("download_finalize", spec, earlier)
    assert (done["source_revision_sha"], done["source_digest"]) == (SHA, "sha256:old") and "output_digest" not in done
    ol = lineage.operator_lineage("download_finalize", ["hf://acme/tiny@" + SHA], ["file:///w/source"], done)
    assert ol.outputs[0].facets["version"].datasetVersion == "sha256:old"


def test_openlineage_names():
    assert lineage.ol_name(f"hf://acme/tiny@{SHA}") == ("https://huggingface.co", "acme/tiny", SHA)
    assert lineage.ol_name("file:///data/my%20model") == ("file", "/data/my model", None)
    assert lineage.ol_name("gs://bucket/a/b") == ("gs://bucket", "a/b", None)


def test_extras_carry_what_the_issue_asks_for():
    spec = RunSpec(source="acme/tiny", revision="main", destination="file:///m/v1", model="qwen3-0.6b", scan=True)
    results = {
        "download": {"revision": SHA, "digest": "sha256:src"},
        "convert": {
            "family": "qwen3",
            "options": {"scan_layers": False, "dtype": "bfloat16"},
            "outputs": {"a": {"bytes": 1, "sha256": "00" * 32}},
        },
        "verify": {
            "dtype": "float32",
            "summary": {"passed": True, "kl_max": 1e-7, "kl_mean": 1e-8, "max_kl_threshold": 0.015},
        },
        "publish": {"destination": "file:///m/v1", "digest": "sha256:pub", "status": "published"},
    }
    ex = lineage.extras("publish", spec, results)
    assert ex["source_revision_sha"] == SHA and ex["model"] == "qwen3-0.6b" and ex["direction"] == "hf-to-maxtext"
    assert ex["layout"] == "unscanned"  # what the manifest says was written wins over the request
    assert ex["dtype"] == "bfloat16" and ex["verify"]["passed"] is True and ex["verify"]["kl_max"] == 1e-7
    assert ex["output_digest"].startswith("sha256:") and ex["published_digest"] == "sha256:pub"
    assert "verify" not in lineage.extras("convert", spec, results)
    assert lineage.extras("download", spec, {})["source_revision"] == "main"


def test_output_digest_is_stable_and_content_based():
    m = {"outputs": {"b": {"bytes": 2, "sha256": "11" * 32}, "a": {"bytes": 1, "sha256": "00" * 32}}}
    same = {"outputs": dict(reversed(list(m["outputs"].items())))}
    assert lineage.recorded_output_digest(m) == lineage.recorded_output_digest(same)
    assert lineage.recorded_output_digest({"outputs": {"a": {"bytes": 1}}}) is None
    assert lineage.recorded_output_digest({"output_digest": "sha256:given"}) == "sha256:given"


def test_operator_lineage_marks_the_verified_checkpoint():
    data = {"step": "verify", "verify": {"passed": False, "max_kl_threshold": 0.015}}
    ol = lineage.operator_lineage("verify", ["file:///w/source", "file:///w/converted"], ["file:///w/verify"], data)
    checkpoint = ol.inputs[1]
    (assertion,) = checkpoint.inputFacets["dataQualityAssertions"].assertions
    assert assertion.success is False and "0.015" in assertion.assertion
    assert ol.run_facets["ckptflow"].extras == data
