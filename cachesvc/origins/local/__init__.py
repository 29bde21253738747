"""The local origin: files in a local directory (also an NFS, SMB or FUSE mount).

* :mod:`~cachesvc.origins.local.origin`: :class:`LocalOrigin`, its worker
  threads, the table of open descriptors and errno values as OriginErrors.
* :mod:`~cachesvc.origins.local.paths`: paths resolved under the root without
  following links, listings, removal and the temporary files behind atomic
  replacement.
* :mod:`~cachesvc.origins.local.fileio`: blocking I/O on open descriptors.
"""

from cachesvc.origins.local.origin import LocalOrigin

__all__ = ["LocalOrigin"]
