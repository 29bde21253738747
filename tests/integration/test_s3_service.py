"""The S3 origin through a real ``cachesvc serve --origin s3://bucket/prefix`` process.

moto's S3 server (started here, on 127.0.0.1) records the requests it gets
(``/moto-api/recorder``), so the test of a small change to a large object
can check which parts went up as ``UploadPart`` and which were copied with
``UploadPartCopy``. Object bytes are always checked with a separate client.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from tests.integration.moto_fixture import FAKE_CREDENTIALS, running_moto_server
from tests.support.content import pattern
from tests.support.servers import ServerProcess, running_cachesvc

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

KiB = 1 << 10
MiB = 1 << 20
PREFIX = "some/prefix"
TIMEOUT = aiohttp.ClientTimeout(total=60)


@dataclass
class Moto:
    endpoint: str
    recording: Path


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    logs = tmp_path_factory.mktemp("moto")
    recording = logs / "recording.jsonl"
    env = {"MOTO_RECORDER_FILEPATH": str(recording)}
    with running_moto_server(logs, env=env) as endpoint:
        yield Moto(endpoint, recording)


@pytest.fixture
def client_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Fake credentials for this process's client and for the cachesvc process."""
    env = {
        **FAKE_CREDENTIALS,
        "AWS_CONFIG_FILE": str(tmp_path / "missing-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "missing-credentials"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    return env


@dataclass
class Service:
    s3: S3Client
    bucket: str
    server: ServerProcess
    http: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return f"{self.server.url}/files/{path}"

    @staticmethod
    def key(path: str) -> str:
        return f"{PREFIX}/{path}"

    async def put_object(self, path: str, data: bytes) -> None:
        await self.s3.put_object(Bucket=self.bucket, Key=self.key(path), Body=data)

    async def object_bytes(self, path: str) -> bytes:
        resp = await self.s3.get_object(Bucket=self.bucket, Key=self.key(path))
        async with resp["Body"] as body:
            return await body.read()

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        async with self.http.get(self.url(path), headers=headers) as resp:
            return resp.status, await resp.read()

    async def put_range(self, path: str, offset: int, data: bytes) -> None:
        headers = {"Content-Range": f"bytes {offset}-{offset + len(data) - 1}/*"}
        async with self.http.put(self.url(path), data=data, headers=headers) as resp:
            assert resp.status in (201, 204), await resp.text()

    async def fsync(self, path: str) -> tuple[int, Any]:
        async with self.http.post(self.url(path) + "?fsync") as resp:
            body = await resp.read()
            return resp.status, json.loads(body) if body else None

    async def origin_bytes_out(self) -> float:
        async with self.http.get(f"{self.server.admin_url}/metrics") as resp:
            text = await resp.text()
        found = re.search(r'^cachesvc_origin_bytes_total\{direction="out"\} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0


@pytest.fixture
async def service(moto: Moto, client_env: dict[str, str], tmp_path: Path) -> AsyncIterator[Service]:
    bucket = f"svc-{uuid.uuid4().hex[:12]}"
    config = AioConfig(s3={"addressing_style": "path"})
    async with get_session().create_client(
        "s3", endpoint_url=moto.endpoint, region_name="us-east-1", config=config
    ) as s3:
        await s3.create_bucket(Bucket=bucket)
        args = ["--s3-endpoint", moto.endpoint, "--dirty-expire", "1h"]
        with running_cachesvc(
            f"s3://{bucket}/{PREFIX}", args, log_dir=tmp_path / "logs", env=client_env
        ) as server:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
                yield Service(s3, bucket, server, http)


def apply(model: bytearray, offset: int, data: bytes) -> None:
    model.extend(bytes(max(0, offset - len(model))))
    model[offset : offset + len(data)] = data


async def test_partial_writes_fsync_listing_put_and_delete(service: Service) -> None:
    model = bytearray(pattern(1, 0, 300 * KiB + 7))
    await service.put_object("dir/obj.bin", bytes(model))
    assert await service.get("dir/obj.bin", {"Range": "bytes=0-8191"}) == (206, bytes(model[:8192]))

    for offset, data in [
        (10, b"on a cached page"),
        (200 * KiB + 1, pattern(2, 0, 20 * KiB)),  # on a gap: edge pages filled first
        (len(model) + 100, b"past the end"),
    ]:
        await service.put_range("dir/obj.bin", offset, data)
        apply(model, offset, data)
    assert await service.get("dir/obj.bin") == (200, bytes(model))
    assert await service.object_bytes("dir/obj.bin") == pattern(1, 0, 300 * KiB + 7)

    assert await service.fsync("dir/obj.bin") == (204, None)
    assert await service.object_bytes("dir/obj.bin") == bytes(model)

    async with service.http.get(
        service.url("dir/"), headers={"Accept": "application/json"}
    ) as resp:
        assert resp.status == 200
        listing = json.dumps(await resp.json())
    assert "obj.bin" in listing

    async with service.http.put(service.url("dir/new.bin"), data=b"whole new object") as resp:
        assert resp.status == 201, await resp.text()
    assert await service.object_bytes("dir/new.bin") == b"whole new object"
    async with service.http.delete(service.url("dir/new.bin")) as resp:
        assert resp.status == 204
    listed = await service.s3.list_objects_v2(Bucket=service.bucket, Prefix=f"{PREFIX}/dir/")
    assert [o["Key"] for o in listed.get("Contents", [])] == [service.key("dir/obj.bin")]


def recorded_puts(recording: Path, key: str) -> list[dict[str, Any]]:
    """The recorded PUT requests to ``key`` (method, url, headers; bodies dropped)."""
    # moto's recorder appends from several threads: entries may share a line.
    text = recording.read_text()
    decoder = json.JSONDecoder()
    found = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return found
        entry, pos = decoder.raw_decode(text, pos)
        if entry["method"] == "PUT" and f"/{key}" in entry["url"]:
            entry.pop("body", None)
            found.append(entry)


async def test_small_write_to_a_large_object_copies_untouched_parts(
    service: Service, moto: Moto
) -> None:
    size = 24 * MiB
    model = bytearray(os.urandom(size))
    await service.put_object("large.bin", bytes(model))
    await service.put_range("large.bin", 9 * MiB + 5, b"a small change")  # in part 2 of 3
    apply(model, 9 * MiB + 5, b"a small change")
    out_before = await service.origin_bytes_out()

    async with service.http.post(f"{moto.endpoint}/moto-api/recorder/reset-recording") as resp:
        assert resp.status == 200
    async with service.http.post(f"{moto.endpoint}/moto-api/recorder/start-recording") as resp:
        assert resp.status == 200
    try:
        assert await service.fsync("large.bin") == (204, None)
    finally:
        async with service.http.post(f"{moto.endpoint}/moto-api/recorder/stop-recording"):
            pass

    assert await service.object_bytes("large.bin") == bytes(model)
    puts = [
        p
        for p in recorded_puts(moto.recording, service.key("large.bin"))
        if "partNumber=" in p["url"]
    ]
    headers = [{k.lower(): v for k, v in p["headers"].items()} for p in puts]
    copies = [h for h in headers if "x-amz-copy-source" in h]
    uploads = [h for h in headers if "x-amz-copy-source" not in h]
    assert (len(copies), len(uploads)) == (2, 1), puts
    uploaded = sum(int(h.get("content-length", 0)) for h in uploads)
    assert uploaded <= 8 * MiB  # one part, not the object
    # The metric counts only the changed bytes handed to the origin.
    assert await service.origin_bytes_out() - out_before < MiB
    uploads_left = await service.s3.list_multipart_uploads(Bucket=service.bucket)
    assert uploads_left.get("Uploads", []) == []


async def test_failing_upload_keeps_data_and_reports_on_fsync(service: Service) -> None:
    original = pattern(3, 0, 100 * KiB)
    model = bytearray(original)
    await service.put_object("f.bin", original)
    assert await service.get("f.bin") == (200, bytes(model))  # cached: no reads needed below
    await service.put_range("f.bin", 5000, b"survives the outage")
    apply(model, 5000, b"survives the outage")

    await service.s3.delete_object(Bucket=service.bucket, Key=service.key("f.bin"))
    await service.s3.delete_bucket(Bucket=service.bucket)
    status, error = await service.fsync("f.bin")
    assert status == 502, error
    assert error["error"] and error["message"]
    assert await service.get("f.bin") == (200, bytes(model))
    status, _ = await service.fsync("f.bin")
    assert status == 502  # a retry does not pretend to succeed

    # The outage ends: the bucket is back with the object as it was.
    await service.s3.create_bucket(Bucket=service.bucket)
    await service.put_object("f.bin", original)
    assert await service.fsync("f.bin") == (204, None)
    assert await service.object_bytes("f.bin") == bytes(model)
    assert await service.get("f.bin") == (200, bytes(model))


async def test_reads_during_a_write_back_follow_the_new_object(service: Service) -> None:
    # A write-back replaces the whole object; fills that started pinned to
    # the old version must follow it to the new one, not fail.
    size = 12 * MiB
    model = bytearray(pattern(7, 0, size))
    await service.put_object("moving.bin", bytes(model))
    rng = random.Random(7)
    errors: list[str] = []

    async def reader(stop: asyncio.Event) -> None:
        while not stop.is_set():
            offset = rng.randrange(size - 64 * KiB) // 4096 * 4096
            headers = {"Range": f"bytes={offset}-{offset + 64 * KiB - 1}"}
            status, body = await service.get("moving.bin", headers)
            if status != 206 or body != bytes(model[offset : offset + 64 * KiB]):
                errors.append(f"{status} at {offset}: {body[:200]!r}")

    for round_ in range(6):
        data = pattern(8 + round_, 0, 1000)
        await service.put_range("moving.bin", round_ * 5000, data)
        apply(model, round_ * 5000, data)
        stop = asyncio.Event()
        readers = [asyncio.create_task(reader(stop)) for _ in range(4)]
        status, _ = await service.fsync("moving.bin")
        stop.set()
        await asyncio.gather(*readers)
        assert status == 204
    assert not errors, errors[:3]
    assert await service.object_bytes("moving.bin") == bytes(model)
