"""The S3 origin (AWS S3, MinIO, Ceph RGW ...), on aiobotocore.

* :mod:`~cachesvc.origins.s3.origin`: :class:`S3Origin`: paths as keys,
  stat, reads, listings, and whole objects written with PutObject or a
  multipart upload.
* :mod:`~cachesvc.origins.s3.multipart`: S3's part limits, the bytes of a
  rewritten object and one multipart upload with its parts sent concurrently.
* :mod:`~cachesvc.origins.s3.client`: the way to the bucket both use: the
  aiobotocore client, library failures as OriginErrors, ranged GetObject
  into buffers, aborts that outlive a cancelled caller.
"""

from cachesvc.origins.s3.origin import S3Origin

__all__ = ["S3Origin"]
