"""Links to a job's images that work without the API key: what OpenAI's `url` is.

With `LESA_API_KEYS` set, /v1 needs a Bearer key, which an `<img src>` or a plain download cannot
send. So the `url` of an image result carries its own authorization: the owner it was made for,
when it expires (with the job's outputs), and an HMAC of the path and both. The HMAC key is
derived from all the API keys together: every replica agrees without more configuration, and a
client, who holds one key, cannot forge a link to another key's job.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from fastapi import Request

from service.errors import ApiError
from service.queue import Job


def signing_key(api_keys: Iterable[str]) -> bytes | None:
    """The HMAC key of the links; None without API keys (links are plain then)."""
    return _signing_key(frozenset(api_keys))


@functools.lru_cache(maxsize=8)  # asked on every /v1 request with keys on: derived once per key set
def _signing_key(api_keys: frozenset[str]) -> bytes | None:
    keys = sorted(api_keys)
    return hashlib.sha256(b"lesa content links\0" + "\0".join(keys).encode()).digest() if keys else None


def _signature(key: bytes, path: str, query: dict[str, str]) -> str:
    return hmac.new(key, f"{path}?{urlencode(sorted(query.items()))}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ContentLinks:
    """Makes the `url` of a job's images: `base_url` is what clients reach this server at."""

    base_url: str
    key: bytes | None

    def image(self, job: Job, index: int) -> str:
        path = f"/v1/images/{job.id}/content"
        query = {"index": str(index)}
        if self.key is not None:
            query |= {"owner": job.spec.owner or "", "expires": str(int(job.expires_at or time.time()))}
            query["sig"] = _signature(self.key, path, query)
        return f"{self.base_url}{path}?{urlencode(query)}"


def signed_owner(key: bytes | None, request: Request) -> str | None:
    """The owner a signed link in `request` was made for; None if it carries none or a wrong one
    (the API key decides then). Links open GET and HEAD of what they were made for, nothing else."""
    pairs = parse_qsl(request.url.query, keep_blank_values=True)
    query = dict(pairs)
    given = query.pop("sig", None)
    if key is None or given is None or request.method not in ("GET", "HEAD") or len(query) + 1 != len(pairs):
        return None  # (a repeated parameter: which one the route reads is not what was signed)
    path = request.url.path.removeprefix(request.scope.get("root_path", "") or "")
    if not {"owner", "expires"} <= set(query) or not hmac.compare_digest(given, _signature(key, path, query)):
        return None
    if int(query["expires"]) < time.time():
        raise ApiError(401, "this link has expired with the job's outputs", code="link_expired")
    return query["owner"]
