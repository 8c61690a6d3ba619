"""The retry policy of every request to an object store, and how its failures are told.

:func:`call` runs one request, retrying it with exponential backoff (and jitter) while
it fails *transiently* -- a 5xx answer, throttling (``SlowDown``, 429), a connection
dropped or reset, a timeout -- up to :attr:`RetryPolicy.tries` tries. Anything else
(403, a missing bucket, a failed precondition) is raised at once: retrying cannot fix
it. The file systems' own retry loops are turned off where we build them (s3fs
``retries=1``, botocore ``max_attempts=1``) so that this is the one policy, not the
product of three.

:func:`describe` turns a failure into the words of an aptckpt error: what the store
said, and the fix. Messages name URLs made by :meth:`Storage.display` (no
credentials) and are scrubbed of every secret the storage options hold.
"""

from __future__ import annotations

import errno
import logging
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from aptckpt import _config

__all__ = ["RetryPolicy", "call", "describe", "is_transient", "scrubber", "status_of"]

log = logging.getLogger("aptckpt")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how patiently, a transient failure is retried."""

    tries: int = _config.REMOTE_TRIES
    wait: float = _config.REMOTE_RETRY_WAIT
    wait_max: float = _config.REMOTE_RETRY_WAIT_MAX

    def delay(self, attempt: int) -> float:
        """Seconds to wait before try ``attempt + 1`` (full jitter over the upper half)."""
        ceiling = min(self.wait_max, self.wait * 2.0**attempt)
        return ceiling * (0.5 + random.random() / 2)


#: Exception class names (anywhere in the MRO) that mean the connection, not the request,
#: failed: botocore, aiohttp, fsspec, azure-core and the standard library spell them so.
_TRANSIENT_CLASSES = frozenset(
    {
        "ConnectionError",
        "TimeoutError",
        "IncompleteRead",
        "HTTPClientError",
        "ConnectionClosedError",
        "EndpointConnectionError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "ResponseParserError",
        "ServerDisconnectedError",
        "ClientPayloadError",
        "ClientConnectionError",
        "ClientOSError",
        "ServerTimeoutError",
        "FSTimeoutError",
        "ServiceRequestError",
        "ServiceResponseError",
        "ChunkedEncodingError",
    }
)
#: Error codes of S3-like stores that ask to be retried.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "ConditionalRequestConflict",
        "OperationAborted",
        "RequestLimitExceeded",
    }
)
#: errnos s3fs gives the translated transient answers (SlowDown, ServiceUnavailable: EBUSY;
#: InternalError: EREMOTEIO) and the kernel gives dropped connections.
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EBUSY,
        getattr(errno, "EREMOTEIO", errno.EIO),
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EAGAIN,
    }
)


def _chain(err: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def status_of(err: BaseException) -> tuple[int | None, str | None]:
    """The HTTP status and the store's error code behind ``err`` (or its causes), if any."""
    for e in _chain(err):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            meta = response.get("ResponseMetadata") or {}
            code = (response.get("Error") or {}).get("Code")
            status = meta.get("HTTPStatusCode")
            if status is None and isinstance(code, str) and code.isdigit():
                status = int(code)
            return (status if isinstance(status, int) else None), code
        for attribute in ("status", "code", "status_code"):
            value = getattr(e, attribute, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value, None
    return None, None


def is_transient(err: BaseException) -> bool:
    """Whether retrying the request that raised ``err`` may succeed."""
    if isinstance(err, (FileNotFoundError, FileExistsError, PermissionError)):
        return False
    status, code = status_of(err)
    if status is not None or code is not None:
        return (status is not None and (status >= 500 or status == 429)) or (
            code in _TRANSIENT_CODES
        )
    for e in _chain(err):
        if any(klass.__name__ in _TRANSIENT_CLASSES for klass in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def call(policy: RetryPolicy, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, retried on transient failures (``what`` names it in logs)."""
    attempt = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            attempt += 1
            if attempt >= policy.tries or not is_transient(err):
                if attempt > 1:
                    err.add_note(f"(after {attempt} tries)")
                raise
            delay = policy.delay(attempt - 1)
            log.debug("%s failed (%s); try %d in %.2fs", what, type(err).__name__, attempt, delay)
            time.sleep(delay)


def tries_of(err: BaseException) -> int:
    """How many tries :func:`call` made before raising ``err`` (1 if it did not retry)."""
    for note in getattr(err, "__notes__", ()):
        found = re.fullmatch(r"\(after (\d+) tries\)", note)
        if found:
            return int(found.group(1))
    return 1


_SECRET_KEY = re.compile(r"key|secret|token|password|credential|sas|signature|connection", re.I)
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def _secrets(options: Any, under_secret_key: bool = False) -> Iterable[str]:
    if isinstance(options, dict):
        for key, value in options.items():
            yield from _secrets(value, under_secret_key or bool(_SECRET_KEY.search(str(key))))
    elif isinstance(options, (list, tuple)):
        for value in options:
            yield from _secrets(value, under_secret_key)
    elif isinstance(options, str) and under_secret_key and len(options) >= 4:
        yield options


def scrubber(options: dict[str, Any]) -> Callable[[str], str]:
    """A function that removes from a text every secret ``options`` hold (values under a
    key naming a key, secret, token, password, ...) and any ``user:password@`` of a URL."""
    secrets = sorted(set(_secrets(options, False)), key=len, reverse=True)

    def scrub(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return _USERINFO.sub("***@", text)

    return scrub


def describe(err: BaseException, scrub: Callable[[str], str]) -> tuple[str, str, int | None]:
    """``(what the store said, what to do about it, errno)`` for a failed request."""
    status, code = status_of(err)
    said = scrub(str(err).strip() or type(err).__name__)
    if code and code not in said:
        said = f"{code}: {said}"
    if isinstance(err, PermissionError) or status in (401, 403):
        fix = (
            "the credentials (storage_options key/secret/token, or the environment's) may not "
            "do this there: check them and the bucket's policy"
        )
        return said, fix, errno.EACCES
    if code == "NoSuchBucket" or "bucket does not exist" in said.lower():
        return said, "the bucket does not exist: create it, or fix the URL", errno.ENOENT
    if isinstance(err, FileNotFoundError):
        return said, "the object is not there: check the URL", errno.ENOENT
    if is_transient(err):
        return (
            f"{said} (after {tries_of(err)} tries)",
            "the store kept failing: check that it is reachable and not overloaded, then retry",
            errno.EIO,
        )
    return said, "fix the cause, then retry", getattr(err, "errno", None) or errno.EIO
