"""S3 origin (AWS S3, MinIO, Ceph RGW ...) on aiobotocore.

A path ``a/b`` is the key ``<prefix>/a/b``; "directories" are key prefixes
ending in ``/`` (listed with ``Delimiter='/'``). Objects cannot be changed in
place, so the origin has no partial writes: the cache buffers writes and hands
them back through :meth:`S3Origin.rewrite`, which writes a new object.

A small new object is assembled in memory and sent with one ``PutObject``. A
large one goes up as a multipart upload of ``part_size`` parts; a part that no
changed range touches and that lies wholly inside the old object is copied
server-side with ``UploadPartCopy``, so a small change to a large object moves
only the parts it touches. ``PutObject`` and ``CompleteMultipartUpload`` are
atomic, so readers see the old object or the new one, never a mix. A multipart
upload that fails or is cancelled is aborted (the abort is shielded from
cancellation), so no incomplete upload is left behind to be billed.

Etags are kept without their quotes (``OriginStat.etag`` is opaque) and quoted
again when sent in ``If-Match`` headers.

The client is created lazily on the running event loop and belongs to it; an
S3Origin must only be used from that loop. The way to the bucket (the client,
errors translated into OriginErrors, ranged reads) is
:class:`~cachesvc.origins.s3.client.BucketClient`, which the multipart
uploads (:mod:`cachesvc.origins.s3.multipart`) use too.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import AsyncIterable, Sequence

from aiobotocore.session import AioSession

from cachesvc.origins.base import (
    Capabilities,
    ChangedReader,
    DirEntry,
    OriginNotFound,
    OriginPermissionDenied,
    OriginStat,
    OriginUnavailable,
    OriginUnsupported,
    base_changed,
)
from cachesvc.origins.s3.client import BucketClient, unquote_etag
from cachesvc.origins.s3.multipart import (
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    MultipartUpload,
    RewriteSource,
    clip_changed,
)

# Named after the package: one logger for the whole origin.
logger = logging.getLogger("cachesvc.origins.s3")


class S3Origin:
    """Files under ``prefix`` in one S3 bucket."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        part_size: int = 8 << 20,
        small_object_limit: int = 8 << 20,
        max_pool_connections: int = 64,
        upload_concurrency: int = 4,
        list_page_size: int = 1000,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        session: AioSession | None = None,
    ) -> None:
        """Raises ValueError for a bad setting.

        Credentials come from botocore's default chain (``AWS_ACCESS_KEY_ID``
        and friends, config files, instance metadata). ``session`` lets a
        caller register botocore event hooks before the client exists.
        """
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"S3 part size must be between 5 MiB and 5 GiB, not {part_size}")
        if not 0 <= small_object_limit <= MAX_PART_SIZE:
            raise ValueError(f"S3 small object limit must be at most 5 GiB: {small_object_limit}")
        if upload_concurrency < 1 or list_page_size < 1 or max_pool_connections < 1:
            raise ValueError("S3 concurrency, page size and pool size must be positive")
        if endpoint_url is not None:
            parts = urllib.parse.urlsplit(endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"invalid S3 endpoint URL {endpoint_url!r}")
        self.bucket = bucket  # Immutable.
        self.prefix = prefix.strip("/")  # Immutable.
        self.endpoint_url = endpoint_url  # Immutable.
        self.region = region  # Immutable.
        self.part_size = part_size  # Immutable.
        self.small_object_limit = small_object_limit  # Immutable.
        self.upload_concurrency = upload_concurrency  # Immutable.
        self.list_page_size = list_page_size  # Immutable.
        self._s3 = BucketClient(  # Immutable.
            bucket,
            name=self.description,
            endpoint_url=endpoint_url,
            region=region,
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            session=session,
        )

    @classmethod
    def from_url(
        cls, url: str, *, endpoint_url: str | None = None, region: str | None = None
    ) -> S3Origin:
        """An S3Origin for ``s3://bucket[/prefix]``; ValueError if malformed."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"invalid S3 origin {url!r}: expected s3://bucket/prefix")
        return cls(parts.netloc, parts.path, endpoint_url=endpoint_url, region=region)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(writable=True, partial_writes=False, durable_sync=False)

    @property
    def description(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}"
        if self.endpoint_url is None:
            return where
        endpoint = urllib.parse.urlsplit(self.endpoint_url)
        return f"{where} at {endpoint.scheme}://{endpoint.netloc.rpartition('@')[2]}"

    # -- plumbing ---------------------------------------------------------------

    def _key(self, path: str) -> str:
        """The object key of a file path; OriginPermissionDenied if the path is invalid."""
        if any(seg in ("", ".", "..") or "\0" in seg for seg in path.split("/")):
            raise OriginPermissionDenied(f"invalid path {path!r}")
        return f"{self.prefix}/{path}" if self.prefix else path

    def _dir_prefix(self, path: str) -> str:
        """The key prefix (ending in '/', or empty) listing directory ``path``."""
        base = self._key(path) if path else self.prefix
        return f"{base}/" if base else ""

    async def _head(self, key: str) -> OriginStat:
        client = await self._s3.client()
        with self._s3.errors(f"HeadObject {key}"):
            resp = await client.head_object(Bucket=self.bucket, Key=key)
        return OriginStat(
            size=resp["ContentLength"],
            mtime=resp["LastModified"].timestamp(),
            etag=unquote_etag(resp["ETag"]),
        )

    async def _head_or_none(self, key: str) -> OriginStat | None:
        try:
            return await self._head(key)
        except OriginNotFound:
            return None

    async def _put(self, key: str, data: bytes) -> None:
        client = await self._s3.client()
        with self._s3.errors(f"PutObject {key}"):
            await client.put_object(Bucket=self.bucket, Key=key, Body=data)

    async def _start_upload(self, key: str) -> MultipartUpload:
        client = await self._s3.client()
        with self._s3.errors(f"CreateMultipartUpload {key}"):
            resp = await client.create_multipart_upload(Bucket=self.bucket, Key=key)
        return MultipartUpload(self._s3, client, key, resp["UploadId"], self.upload_concurrency)

    # -- reading ------------------------------------------------------------------

    async def stat(self, path: str) -> OriginStat:
        return await self._head(self._key(path))

    async def read_into(
        self, path: str, offset: int, buffers: Sequence[memoryview], etag: str | None = None
    ) -> int:
        return await self._s3.get_into(self._key(path), offset, buffers, etag)

    async def list_dir(self, path: str) -> list[DirEntry]:
        prefix = self._dir_prefix(path)
        client = await self._s3.client()
        entries: list[DirEntry] = []
        seen_any = False
        paginator = client.get_paginator("list_objects_v2")
        with self._s3.errors(f"ListObjectsV2 {prefix}"):
            async for page in paginator.paginate(
                Bucket=self.bucket,
                Prefix=prefix,
                Delimiter="/",
                PaginationConfig={"PageSize": self.list_page_size},
            ):
                for common in page.get("CommonPrefixes", []):
                    seen_any = True
                    name = common.get("Prefix", "")[len(prefix) : -1]
                    if _listable(name):
                        entries.append(DirEntry(name, is_dir=True, size=0, mtime=0.0))
                for obj in page.get("Contents", []):
                    seen_any = True
                    name = obj["Key"][len(prefix) :]
                    if _listable(name):  # the "dir/" marker itself has an empty name
                        entries.append(
                            DirEntry(
                                name,
                                is_dir=False,
                                size=obj["Size"],
                                mtime=obj["LastModified"].timestamp(),
                            )
                        )
        if not seen_any and path:
            raise OriginNotFound(f"no directory {path!r} in {self.description}")
        entries.sort(key=lambda entry: entry.name)
        return entries

    async def check(self) -> None:
        client = await self._s3.client()
        try:
            with self._s3.errors(f"HeadBucket {self.bucket}"):
                await client.head_bucket(Bucket=self.bucket)
        except OriginNotFound as exc:
            raise OriginUnavailable(f"bucket {self.bucket!r} does not exist") from exc

    # -- writing ------------------------------------------------------------------

    async def write_from(self, path: str, offset: int, buffers: Sequence[memoryview]) -> int:
        raise OriginUnsupported("S3 objects cannot be written in place")

    async def set_size(self, path: str, size: int) -> None:
        raise OriginUnsupported("S3 objects cannot be resized in place")

    async def allocate(self, path: str, offset: int, length: int) -> None:
        raise OriginUnsupported("S3 objects cannot be allocated in place")

    async def sync(self, path: str) -> None:
        """Nothing to do: an object is durable once its write returned."""

    async def rewrite(
        self,
        path: str,
        size: int,
        changed: Sequence[tuple[int, int]],
        read_changed: ChangedReader,
        base_etag: str | None = None,
    ) -> OriginStat:
        """Writes the new object; old bytes are read (or copied) at the old etag.

        If the object changes at the origin meanwhile, the ranged reads and
        (on S3) the part copies fail with OriginConflict and nothing is written.
        Exceptions raised by ``read_changed`` propagate unchanged.
        """
        key = self._key(path)
        old = await self._head_or_none(key)
        if base_etag is not None and (old is None or old.etag != base_etag):
            raise base_changed(path)
        source = RewriteSource(self._s3, key, old, clip_changed(changed, size), read_changed)
        if size <= self.small_object_limit:
            await self._put(key, bytes(await source.assemble(0, size)))
            return await self._head(key)
        part_size = self._part_size_for(size)
        upload = await self._start_upload(key)
        try:
            for start in range(0, size, part_size):
                end = min(start + part_size, size)
                if source.can_copy(start, end):
                    await upload.copy_part(start, end, source.old_etag)
                else:
                    await upload.upload_part(bytes(await source.assemble(start, end)))
            await upload.complete()
        except BaseException:
            await upload.abort()
            raise
        return await self._head(key)

    def _part_size_for(self, size: int) -> int:
        """``part_size``, or larger (whole MiB) if ``size`` needs more than MAX_PARTS parts."""
        needed = -(-size // MAX_PARTS)
        return max(self.part_size, -(-needed // (1 << 20)) << 20)

    async def replace(self, path: str, chunks: AsyncIterable[bytes]) -> OriginStat:
        """Streams ``chunks`` into a new object, holding at most a few parts in memory."""
        key = self._key(path)
        pending = bytearray()
        upload: MultipartUpload | None = None
        try:
            async for chunk in chunks:
                pending += chunk
                while len(pending) > self.part_size:
                    if upload is None:
                        upload = await self._start_upload(key)
                    await upload.upload_part(bytes(pending[: self.part_size]))
                    del pending[: self.part_size]
            if upload is None:
                await self._put(key, bytes(pending))
            else:
                await upload.upload_part(bytes(pending))
                await upload.complete()
        except BaseException:
            if upload is not None:
                await upload.abort()
            raise
        return await self._head(key)

    async def create(self, path: str) -> OriginStat:
        """Puts an empty object unless one exists ("directories" need no creating)."""
        key = self._key(path)
        existing = await self._head_or_none(key)
        if existing is not None:
            return existing
        await self._put(key, b"")
        return await self._head(key)

    async def remove(self, path: str) -> None:
        key = self._key(path)
        await self._head(key)  # DeleteObject succeeds for missing keys
        client = await self._s3.client()
        with self._s3.errors(f"DeleteObject {key}"):
            await client.delete_object(Bucket=self.bucket, Key=key)

    async def close(self) -> None:
        """Waits for pending aborts, then closes the client's connections."""
        await self._s3.close()


def _listable(name: str) -> bool:
    """Whether a listed key name can be addressed as a path segment."""
    return name not in ("", ".", "..") and "\0" not in name
