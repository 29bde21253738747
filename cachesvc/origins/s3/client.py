"""The S3 origin's way to its bucket, used by S3Origin and by its multipart
uploads alike: the aiobotocore client, the translation of botocore's and
aiohttp's failures into OriginErrors, the ranged GetObject into the caller's
buffers and the aborts of multipart uploads that outlived a cancelled caller.

Lock order:
    BucketClient._client_lock

The client is created lazily on the running event loop and belongs to it; a
BucketClient must only be used from that loop. Etags are handled without
their quotes and quoted again when sent in ``If-Match`` headers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    ReadTimeoutError,
)

from cachesvc.origins.base import (
    OriginConflict,
    OriginError,
    OriginNoSpace,
    OriginNotFound,
    OriginPermissionDenied,
    OriginTimeout,
    OriginUnavailable,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "403",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
    }
)
_CONFLICT_CODES = frozenset({"PreconditionFailed", "412"})
_NO_SPACE_CODES = frozenset({"EntityTooLarge", "QuotaExceeded", "XMinioStorageFull"})
_TIMEOUT_CODES = frozenset({"RequestTimeout", "RequestTimeTooSkewed"})


def quote_etag(etag: str) -> str:
    """``etag`` quoted, as S3 wants it in ``If-Match`` headers."""
    return f'"{etag}"'


def unquote_etag(etag: str) -> str:
    """An etag as S3 sends it, without its quotes."""
    return etag.strip('"')


def _error_code(exc: ClientError) -> tuple[str, int]:
    """The S3 error code and HTTP status of ``exc`` (status 0 when unknown)."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return code, status


def translate_error(exc: Exception, what: str, bucket: str) -> OriginError:
    """The OriginError for a failure of aiobotocore, botocore or aiohttp.

    ``what`` names the operation and key for the message. A missing bucket is
    a misconfiguration, not a missing file: OriginUnavailable.
    """
    if isinstance(exc, ClientError):
        code, status = _error_code(exc)
        detail = f"{what}: {code or status} {exc.response.get('Error', {}).get('Message', '')}"
        if code == "NoSuchBucket":
            return OriginUnavailable(f"{what}: bucket {bucket!r} does not exist")
        if code in _NOT_FOUND_CODES or status == 404:
            return OriginNotFound(detail)
        if code in _DENIED_CODES or status == 403:
            return OriginPermissionDenied(detail)
        if code in _CONFLICT_CODES or status == 412:
            return OriginConflict(detail)
        if code in _NO_SPACE_CODES or status == 507:
            return OriginNoSpace(detail)
        if code in _TIMEOUT_CODES:
            return OriginTimeout(detail)
        return OriginUnavailable(detail)
    if isinstance(exc, ReadTimeoutError | ConnectTimeoutError | TimeoutError):
        return OriginTimeout(f"{what}: {exc or type(exc).__name__}")
    return OriginUnavailable(f"{what}: {exc or type(exc).__name__}")


class BucketClient:
    """One S3 bucket, through a client created on first use."""

    def __init__(
        self,
        bucket: str,
        *,
        name: str,
        endpoint_url: str | None,
        region: str | None,
        max_pool_connections: int,
        connect_timeout: float,
        read_timeout: float,
        session: AioSession | None,
    ) -> None:
        """``name`` (the origin's description) names the bucket in messages."""
        self.bucket = bucket  # Immutable.
        self._name = name  # Immutable.
        self._endpoint_url = endpoint_url  # Immutable.
        self._region = region  # Immutable.
        self._session = session or get_session()  # Immutable.
        self._config = AioConfig(  # Immutable.
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_pool_connections,
            # Checksums only where S3 requires them: MinIO and Ceph releases
            # before 2025 reject the CRC trailers newer botocore adds by default.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client_lock = asyncio.Lock()
        self._stack: AsyncExitStack | None = None  # Protected by _client_lock.
        # Changed under _client_lock (set on first use, cleared by close);
        # read without it.
        self._client: S3Client | None = None
        self._closed = False  # Protected by _client_lock.
        # Aborts of multipart uploads that outlived a cancelled caller; close()
        # waits for them. Only touched on the event loop.
        self._aborts: set[asyncio.Task[None]] = set()

    async def client(self) -> S3Client:
        """The client, created by the first call; OriginUnavailable once closed."""
        client = self._client
        if client is not None:
            return client
        async with self._client_lock:
            if self._closed:
                raise OriginUnavailable(f"{self._name}: origin is closed")
            client = self._client
            if client is None:
                stack = AsyncExitStack()
                with self.errors("connecting"):
                    client = await stack.enter_async_context(
                        self._session.create_client(
                            "s3",
                            endpoint_url=self._endpoint_url,
                            region_name=self._region,
                            config=self._config,
                        )
                    )
                self._stack = stack
                self._client = client
            return client

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Translates library failures inside the block into OriginErrors.

        Everything else (OriginErrors, the caller's own exceptions from
        ``read_changed`` or ``chunks``, cancellation) passes through.
        """
        try:
            yield
        except (ClientError, BotoCoreError, aiohttp.ClientError, TimeoutError) as exc:
            raise translate_error(exc, what, self.bucket) from exc

    async def get_into(
        self, key: str, offset: int, buffers: Sequence[memoryview], etag: str | None
    ) -> int:
        """Fills ``buffers`` from ``offset`` of ``key`` with one ranged GetObject."""
        total = sum(len(buf) for buf in buffers)
        if total == 0:
            return 0
        client = await self.client()
        what = f"GetObject {key}"
        with self.errors(what):
            try:
                if etag is None:
                    resp = await client.get_object(
                        Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + total - 1}"
                    )
                else:
                    resp = await client.get_object(
                        Bucket=self.bucket,
                        Key=key,
                        Range=f"bytes={offset}-{offset + total - 1}",
                        IfMatch=quote_etag(etag),
                    )
            except ClientError as exc:
                code, status = _error_code(exc)
                if code == "InvalidRange" or status == 416:
                    return 0  # offset at or past the end
                raise
            async with resp["Body"] as body:
                # A server that ignores Range answers 200 with the whole object.
                content_range = resp.get("ContentRange", "")
                if (offset > 0 or content_range) and not content_range.startswith(
                    f"bytes {offset}-"
                ):
                    raise OriginUnavailable(f"{what}: range ignored ({content_range!r})")
                filled = 0
                for buf in buffers:
                    pos = 0
                    while pos < len(buf):
                        n = await body.readinto(buf[pos:])  # type: ignore[arg-type]
                        if n == 0:
                            return filled
                        pos += n
                        filled += n
                return filled

    def keep_abort(self, task: asyncio.Task[None]) -> None:
        """Keeps ``task`` (an abort whose caller was cancelled) alive until it ends."""
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def close(self) -> None:
        """Waits for pending aborts, then closes the client's connections."""
        if self._aborts:
            await asyncio.gather(*self._aborts, return_exceptions=True)
        async with self._client_lock:
            self._closed = True
            stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()
