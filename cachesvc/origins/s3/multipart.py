"""How S3Origin builds a new object from parts: S3's part limits, the
bytes of a rewritten object (old bytes, changed bytes, zeros) and one
in-progress multipart upload with its parts sent concurrently.

These helpers belong to :class:`~cachesvc.origins.s3.origin.S3Origin` but
reach the bucket only through the
:class:`~cachesvc.origins.s3.client.BucketClient` it hands them (errors
translated, ranged reads, aborts that outlive their caller); they are only
used from the task that runs the rewrite or replace.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from cachesvc.origins.base import ChangedReader, OriginConflict, OriginNoSpace, OriginStat
from cachesvc.origins.s3.client import BucketClient, quote_etag

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

# S3Origin's logger: an upload is part of its work.
logger = logging.getLogger("cachesvc.origins.s3")

MIN_PART_SIZE = 5 << 20
"""S3's smallest part (all parts but the last), and the smallest object whose
ranges ``UploadPartCopy`` may copy."""

MAX_PART_SIZE = 5 << 30
"""S3's largest part, and the largest ``PutObject``."""

MAX_PARTS = 10_000
"""S3's largest part number."""


def clip_changed(changed: Sequence[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """``changed`` clipped to ``[0, size)``, empty ranges dropped."""
    clipped = [(max(start, 0), min(end, size)) for start, end in changed]
    return [(start, end) for start, end in clipped if start < end]


class RewriteSource:
    """The bytes of a rewritten object: old bytes, changed bytes and zeros. Immutable."""

    def __init__(
        self,
        s3: BucketClient,
        key: str,
        old: OriginStat | None,
        changed: list[tuple[int, int]],
        read_changed: ChangedReader,
    ) -> None:
        self._s3 = s3
        self._key = key
        self.old_size = old.size if old is not None else 0
        self.old_etag = old.etag if old is not None else ""
        self._changed = changed
        self._starts = [start for start, _ in changed]
        self._read_changed = read_changed

    def _changed_in(self, start: int, end: int) -> list[tuple[int, int]]:
        """The changed ranges overlapping ``[start, end)``, clipped to it."""
        i = max(bisect_right(self._starts, start) - 1, 0)
        found = []
        for cstart, cend in self._changed[i:]:
            if cstart >= end:
                break
            if cend > start:
                found.append((max(cstart, start), min(cend, end)))
        return found

    def can_copy(self, start: int, end: int) -> bool:
        """Whether part ``[start, end)`` is old bytes that UploadPartCopy may copy."""
        return (
            self.old_size > MIN_PART_SIZE
            and end <= self.old_size
            and not self._changed_in(start, end)
        )

    async def assemble(self, start: int, end: int) -> bytearray:
        """The new bytes of ``[start, end)``.

        The old bytes it needs come from one ranged GetObject spanning them all
        (changed bytes in between are fetched and overwritten): one request
        per part however scattered the changes are.
        """
        buf = bytearray(end - start)  # zeros, which is right past the old size
        view = memoryview(buf)
        changed = self._changed_in(start, end)
        old_end = min(end, self.old_size)
        unchanged = [
            (gstart, gend)
            for gstart, gend in zip(
                [start] + [cend for _, cend in changed],
                [cstart for cstart, _ in changed] + [old_end],
                strict=True,
            )
            if gstart < min(gend, old_end)
        ]
        if unchanged:
            first, last = unchanged[0][0], min(unchanged[-1][1], old_end)
            want = last - first
            got = await self._s3.get_into(
                self._key, first, [view[first - start : last - start]], self.old_etag
            )
            if got != want:
                raise OriginConflict(f"{self._key} shrank while being rewritten")
        for cstart, cend in changed:
            data = await self._read_changed(cstart, cend - cstart)
            if len(data) != cend - cstart:
                raise RuntimeError(
                    f"read_changed({cstart}, {cend - cstart}) returned {len(data)} bytes"
                )
            view[cstart - start : cend - start] = data
        return buf


class MultipartUpload:
    """One in-progress multipart upload; parts go up ``concurrency`` at a time.

    Parts are numbered in the order they are handed in. Only used by the task
    that started it.
    """

    def __init__(
        self, s3: BucketClient, client: S3Client, key: str, upload_id: str, concurrency: int
    ) -> None:
        self._s3 = s3  # Immutable.
        self._client = client  # Immutable.
        self._key = key  # Immutable.
        self._upload_id = upload_id  # Immutable.
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: list[asyncio.Task[CompletedPartTypeDef]] = []

    def _check_failed(self) -> None:
        """Re-raises the error of the first part that failed so far."""
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                task.result()

    async def _spawn(self, send: Callable[[int], Awaitable[str]], what: str) -> None:
        """Waits for a free slot, then sends a part in the background."""
        await self._slots.acquire()
        try:
            self._check_failed()
        except BaseException:
            self._slots.release()
            raise
        number = len(self._tasks) + 1
        if number > MAX_PARTS:
            self._slots.release()
            raise OriginNoSpace(f"{self._key}: more than {MAX_PARTS} parts")

        async def run() -> CompletedPartTypeDef:
            try:
                with self._s3.errors(f"{what} {self._key} part {number}"):
                    etag = await send(number)
                return {"PartNumber": number, "ETag": etag}
            finally:
                self._slots.release()

        self._tasks.append(asyncio.create_task(run()))

    async def upload_part(self, data: bytes) -> None:
        async def send(number: int) -> str:
            resp = await self._client.upload_part(
                Bucket=self._s3.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=data,
            )
            return resp["ETag"]

        await self._spawn(send, "UploadPart")

    async def copy_part(self, start: int, end: int, etag: str) -> None:
        """Copies ``[start, end)`` of the current object (which must have ``etag``)."""

        async def send(number: int) -> str:
            resp = await self._client.upload_part_copy(
                Bucket=self._s3.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                CopySource={"Bucket": self._s3.bucket, "Key": self._key},
                CopySourceRange=f"bytes={start}-{end - 1}",
                CopySourceIfMatch=quote_etag(etag),
            )
            return resp["CopyPartResult"]["ETag"]

        await self._spawn(send, "UploadPartCopy")

    async def complete(self) -> None:
        parts = list(await asyncio.gather(*self._tasks))
        with self._s3.errors(f"CompleteMultipartUpload {self._key}"):
            await self._client.complete_multipart_upload(
                Bucket=self._s3.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            )

    async def abort(self) -> None:
        """Stops the part uploads and aborts the upload; raises only CancelledError.

        The work runs in its own task: if the caller is cancelled again
        meanwhile, it still finishes (S3Origin.close waits for it).
        """
        abort = asyncio.create_task(self._abort_now())
        try:
            await asyncio.shield(abort)
        except asyncio.CancelledError:
            self._s3.keep_abort(abort)
            raise

    async def _abort_now(self) -> None:
        # Parts still in flight could land after the abort and be kept.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._client.abort_multipart_upload(
                Bucket=self._s3.bucket, Key=self._key, UploadId=self._upload_id
            )
        except (ClientError, BotoCoreError, aiohttp.ClientError, TimeoutError) as exc:
            logger.warning(
                "could not abort multipart upload %s of %s: %s", self._upload_id, self._key, exc
            )
