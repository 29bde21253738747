"""Directory listings: GET and HEAD of ``/files/<dir>/``, as nginx's
``autoindex_format json`` or as an HTML index.

A listing shows only the names a client could request (valid UTF-8, no
control characters ...); a file that is newer in the cache than at the
origin (dirty here) is listed with the cache's size and mtime.
"""

from __future__ import annotations

import html
import json
import urllib.parse

from aiohttp import web

from cachesvc.api.http.paths import BadPath, validate_path
from cachesvc.api.listener import DataState
from cachesvc.origins.base import DirEntry
from cachesvc.wire import FILES_PREFIX, format_http_date


def _visible(entry: DirEntry) -> bool:
    """Whether a name could be requested at all (valid UTF-8, no control characters ...)."""
    try:
        validate_path(entry.name)
    except BadPath:
        return False
    return "/" not in entry.name


async def list_directory(request: web.Request, state: DataState, path: str) -> web.Response:
    """GET and HEAD of ``/files/<dir>/``: nginx ``autoindex_format json`` or HTML."""
    entries = [e for e in await state.cache.origin.list_dir(path) if _visible(e)]
    entries.sort(key=lambda e: (not e.is_dir, e.name))
    prefix = f"{path}/" if path else ""
    items: list[dict[str, object]] = []
    for entry in entries:
        item: dict[str, object] = {
            "name": entry.name,
            "type": "directory" if entry.is_dir else "file",
        }
        size, mtime = entry.size, entry.mtime
        cached = None if entry.is_dir else state.cache.lookup(prefix + entry.name)
        if cached is not None:  # newer than the origin while dirty here
            size, mtime = cached.attr.size, cached.attr.mtime
        item["mtime"] = format_http_date(mtime)
        if not entry.is_dir:
            item["size"] = size
        items.append(item)
    accept = request.headers.get("Accept", "").lower()
    if "application/json" in accept:
        return web.Response(
            text=json.dumps(items, ensure_ascii=False), content_type="application/json"
        )
    return web.Response(
        text=_html_index(f"{FILES_PREFIX}{prefix}", items), content_type="text/html"
    )


def _html_index(location: str, items: list[dict[str, object]]) -> str:
    title = html.escape(f"Index of {location}")
    lines = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{title}</title></head>",
        f"<body><h1>{title}</h1><hr><pre>",
        '<a href="../">../</a>',
    ]
    for item in items:
        name = str(item["name"])
        is_dir = item["type"] == "directory"
        href = urllib.parse.quote(name) + ("/" if is_dir else "")
        label = html.escape(name + ("/" if is_dir else ""))
        size = "-" if is_dir else str(item["size"])
        lines.append(f'<a href="{href}">{label}</a>  {item["mtime"]}  {size}')
    lines += ["</pre><hr></body></html>", ""]
    return "\n".join(lines)
