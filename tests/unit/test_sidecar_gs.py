"""``gs://`` sources: URI rules, Cloud Storage's S3-compatible API (moto as the endpoint)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from aiohttp import web

from sidecar.modelsource import ModelSourceError, parse_model_arg, parse_model_uri
from sidecar.sources import RemoteFile, Source, SourceUnauthorizedError, open_source
from sidecar.sources.gs import DEFAULT_ENDPOINT, gcs_access
from sidecar.sources.s3 import S3Source
from tests.fixtures.servers import ServedModel, ServerURL, _serve_app


def test_gs_uris_are_normalized_and_keyed_like_s3() -> None:
    src = parse_model_uri("gs://my_models.example/llama//3b/")
    assert (src.scheme, src.location, src.uri) == (
        "gs",
        "my_models.example/llama/3b/",
        "gs://my_models.example/llama/3b/",
    )
    assert parse_model_uri("GS://models/a").uri == "gs://models/a/"
    # stable: equal sources share a key; the scheme is part of it (gs and s3 never collide)
    assert src.cache_key == parse_model_uri("gs://my_models.example/llama/3b").cache_key
    assert src.cache_key == "my-models-example-llama-3b-" + src.cache_key.rsplit("-", 1)[1]
    assert parse_model_uri("gs://models/a").cache_key != parse_model_uri("s3://models/a").cache_key
    # a key names node labels and cache directories: it never changes between releases
    assert parse_model_uri("gs://models/llama-3b").cache_key == "models-llama-3b-5f5827c4a4cf"
    assert parse_model_arg("base=gs://models/a").to_arg() == "base=gs://models/a/"


@pytest.mark.parametrize(
    "uri",
    ["gs://", "gs://UPPER/x", "gs://ab", "gs://-models/x", "gs://a..b/x", "gs://" + "a" * 64],
)
def test_bad_gs_buckets_are_named(uri: str) -> None:
    with pytest.raises(ModelSourceError, match="not a valid Cloud Storage bucket name"):
        parse_model_uri(uri)


def test_gcs_access_defaults_and_its_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("GCS_ENDPOINT_URL", "GCS_ACCESS_KEY_ID", "GCS_SECRET_ACCESS_KEY", "GCS_REGION"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDAWS")  # never sent to Cloud Storage
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.invalid")
    access = gcs_access("models")
    assert (access.base, access.region, access.credentials) == (
        f"{DEFAULT_ENDPOINT}/models",
        "auto",
        None,
    )
    monkeypatch.setenv("GCS_ACCESS_KEY_ID", "GOOG1EXAMPLE")
    monkeypatch.setenv("GCS_SECRET_ACCESS_KEY", "hmac-secret")
    monkeypatch.setenv("GCS_ENDPOINT_URL", "http://127.0.0.1:9/")
    access = gcs_access("models")
    assert access.base == "http://127.0.0.1:9/models"
    assert access.credentials is not None and access.credentials.access_key == "GOOG1EXAMPLE"


def _gs_env(monkeypatch: pytest.MonkeyPatch, server: ServerURL) -> None:
    monkeypatch.setenv("GCS_ENDPOINT_URL", server.rstrip("/"))
    monkeypatch.setenv("GCS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("GCS_SECRET_ACCESS_KEY", server.secret_key)
    monkeypatch.delenv("GCS_REGION", raising=False)  # "auto", as against Cloud Storage
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(key, raising=False)


async def _read(src: Source, path: str, start: int, end: int) -> bytes:
    return b"".join([c async for c in src.read_range(path, start, end)])


async def test_gs_source_lists_and_reads_through_the_s3_api(
    s3_model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    _gs_env(monkeypatch, s3_model.server)
    src = open_source(parse_model_arg("m=gs://models/tiny-llama"))
    assert isinstance(src, S3Source) and src.uri == "gs://models/tiny-llama/"
    try:
        files = sorted(await src.list_files(), key=lambda f: f.path)
        assert files == sorted(
            (RemoteFile(f.path, f.size) for f in s3_model.info.files.values()),
            key=lambda f: f.path,
        )
        shard = s3_model.info.weight_files[-1]
        raw = (s3_model.info.root / shard).read_bytes()
        assert await _read(src, shard, 0, len(raw)) == raw
        assert await _read(src, shard, 100, 5000) == raw[100:5000]
    finally:
        await src.aclose()


async def test_gs_wrong_hmac_secret_is_an_access_error(
    s3_model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    _gs_env(monkeypatch, s3_model.server)
    monkeypatch.setenv("GCS_SECRET_ACCESS_KEY", "not-the-secret")
    src = open_source(parse_model_arg("m=gs://models/tiny-llama"))
    try:
        with pytest.raises(SourceUnauthorizedError, match=r"gs://models/tiny-llama/") as err:
            await src.list_files()
        # the advice names Cloud Storage's own variables, never the AWS ones
        assert "Cloud Storage rejects the credentials" in str(err.value)
        assert "GCS_ACCESS_KEY_ID, GCS_SECRET_ACCESS_KEY" in str(err.value)
        assert "AWS_" not in str(err.value)
    finally:
        await src.aclose()


# Cloud Storage answers ListObjectsV2 in its own XML namespace, not AWS's
_GCS_LISTING = """<?xml version='1.0' encoding='UTF-8'?>
<ListBucketResult xmlns="http://doc.s3.amazonaws.com/2006-03-01">
<Name>models</Name><Prefix>m/</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>
<IsTruncated>false</IsTruncated>
<Contents><Key>m/config.json</Key><Generation>1</Generation><MetaGeneration>1</MetaGeneration>
<LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>"abc"</ETag><Size>2</Size></Contents>
<Contents><Key>m/w/model.safetensors</Key><Generation>1</Generation>
<LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>"def"</ETag><Size>5</Size></Contents>
</ListBucketResult>"""


@pytest.fixture
def gcs_shaped() -> Iterator[ServerURL]:
    async def bucket(request: web.Request) -> web.Response:
        assert request.query["list-type"] == "2" and request.query["prefix"] == "m/"
        return web.Response(text=_GCS_LISTING, content_type="application/xml")

    app = web.Application()
    app.router.add_get("/models/", bucket)
    with _serve_app(app) as url:
        yield url


async def test_gs_reads_cloud_storage_s_own_listing_namespace(
    gcs_shaped: ServerURL, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GCS_ENDPOINT_URL", gcs_shaped.rstrip("/"))
    for key in ("GCS_ACCESS_KEY_ID", "GCS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)  # a public bucket: anonymous requests
    src = open_source(parse_model_arg("m=gs://models/m"))
    try:
        assert src.uses_credentials is False  # type: ignore[attr-defined]
        assert sorted(await src.list_files(), key=lambda f: f.path) == [
            RemoteFile("config.json", 2),
            RemoteFile("w/model.safetensors", 5),
        ]
    finally:
        await src.aclose()
