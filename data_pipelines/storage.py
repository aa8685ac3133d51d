"""Object storage behind one URI form: a local path or `s3://bucket/prefix`.

The S3 endpoint, region and credentials come only from the standard AWS environment
(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
...), so boto3, pyarrow and Ray all read the same settings. Nothing here logs a credential.
"""

from __future__ import annotations

import os
import posixpath
import random
import re
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlparse

if TYPE_CHECKING:  # pyarrow is imported on first use: importing this module stays cheap
    import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A storage problem phrased for the user (never includes credentials)."""


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


# scheme://userinfo@host: anything before an `@` in the authority (user:password or a bare token)
_USERINFO_RE = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#@]+@", re.IGNORECASE)
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)
# query/fragment parameter names that carry a secret (compared lower-case, `-` read as `_`)
_SECRET_PARAMS = frozenset({
    "token", "access_token", "refresh_token", "id_token", "auth_token", "session_token",
    "password", "passwd", "secret", "client_secret", "sig", "signature", "api_key", "apikey",
    "x_amz_signature", "x_amz_credential", "x_amz_security_token",
    "x_goog_signature", "x_goog_credential",
})


def has_credentials(uri: str) -> bool:
    """Whether a URI of any scheme embeds a secret: `user:password@` or a bare `TOKEN@` in its
    authority, or a secret-bearing query/fragment parameter (`?token=`, `X-Amz-Signature=`,
    `password=`, `sig=`, `api_key=`, ..., case-insensitive, non-empty value).

    `models:/name@alias` (no `//` authority) and `@` in a path are not credentials.
    """
    if not uri or not _SCHEME_RE.match(uri):
        return False
    if _USERINFO_RE.match(uri):
        return True
    # split by hand: urlsplit raises on some malformed authorities, and this must never raise
    rest, _, fragment = uri.partition("#")
    for part in (rest.partition("?")[2], fragment):
        for name, value in parse_qsl(part, keep_blank_values=True):
            if value and name.strip().lower().replace("-", "_") in _SECRET_PARAMS:
                return True
    return False


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _pafs():
    """pyarrow.fs, imported on first use (the CLI answers config errors before heavy imports)."""
    import pyarrow.fs

    return pyarrow.fs


# Bounded retries and timeouts for every S3 request (pyarrow's S3FileSystem: this module,
# Ray Data reads and writes, Ray Train checkpoints). Object stores fail a small fraction of
# requests transiently (500 InternalError, 503 SlowDown, reset connections), so each request
# is retried; the bounds make a dead endpoint fail with an error instead of hanging.
# AWS "standard" retries back off a random 0-1 s, doubling per retry (capped at 20 s): five
# attempts wait at most 1 + 2 + 4 + 8 = 15 s in all, and a request failing five times in a
# row at a 10% transient fault rate is a 1-in-100,000 event. Worst cases for one request
# against a dead endpoint: refused, at most 15 s; connects dropped silently, 5 x 5 s + 15 s;
# connections accepted but never answered, 5 x 10 s + 15 s.
S3_MAX_ATTEMPTS = 5
# Connecting (TCP, plus TLS on https) within 5 s: the SDK default of 1 s is tight for a
# cross-region endpoint or a busy S3-compatible store; a blackholed host costs 5 s per try.
S3_CONNECT_TIMEOUT_S = 5.0
# A request whose response stalls (no byte received) this long is aborted and retried (on
# Linux curl applies it as a low-speed limit, not a total deadline, so large transfers are
# fine). The SDK default of 3 s aborts legitimate slow server-side work, such as completing
# a large checkpoint's multipart upload on a loaded store, and the retry only adds load.
S3_REQUEST_TIMEOUT_S = 10.0


@lru_cache(maxsize=1)
def _s3_filesystem_class() -> type:
    """pyarrow's S3FileSystem, pickled by its settings here instead: pyarrow (25.x) leaves
    the retry strategy out of its own pickle (apache/arrow GH-47348), so the copies Ray ships
    to its workers (Ray Data reads and writes, Ray Train checkpoints) would retry with the
    default 3 attempts. Unpickling rebuilds the filesystem with this module's settings."""

    class S3FileSystem(_pafs().S3FileSystem):
        def __reduce__(self):
            return _s3_filesystem, self._settings

    return S3FileSystem


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": region,
        "retry_strategy": _pafs().AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "request_timeout": S3_REQUEST_TIMEOUT_S,
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    filesystem = _s3_filesystem_class()(**kwargs)
    filesystem._settings = (endpoint, region)  # no secrets: credentials come from the env
    return filesystem


def s3_filesystem() -> pafs.S3FileSystem:
    return _s3_filesystem(s3_endpoint(), s3_region())


# One transient S3 failure the AWS SDK files as final: pyarrow reads an object (or a range)
# into a buffer of exactly its size, and the SDK writes an error response's body (the XML of
# a 500 InternalError or 503 SlowDown, a few hundred bytes) into that buffer too. For a
# smaller object (DONE.json, a small manifest) it overflows, curl aborts, and the request
# fails with INTERNAL_FAILURE "Failed to flush response stream", never retried by the SDK.
_MISFILED_TRANSIENT = "Failed to flush response stream"


def retry_misfiled_transient(read):
    """`read()`, repeated (at most S3_MAX_ATTEMPTS times, with the SDK's standard backoff)
    while it fails with the transient error above; for idempotent whole-object reads."""
    for attempt in range(1, S3_MAX_ATTEMPTS + 1):
        try:
            return read()
        except OSError as exc:
            if _MISFILED_TRANSIENT not in str(exc) or attempt == S3_MAX_ATTEMPTS:
                raise
            time.sleep(random.uniform(0.0, min(2.0 ** (attempt - 1), 20.0)))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Location:
    """A resolved URI: a pyarrow filesystem and the path inside it (no scheme)."""

    uri: str
    filesystem: pafs.FileSystem
    path: str

    @property
    def is_s3(self) -> bool:
        return is_s3_uri(self.uri)

    def join(self, *parts: str) -> Location:
        joined_uri = posixpath.join(self.uri.rstrip("/"), *parts)
        return Location(joined_uri, self.filesystem, posixpath.join(self.path, *parts))

    def exists(self) -> bool:
        try:
            return self.filesystem.get_file_info(self.path).type != _pafs().FileType.NotFound
        except OSError as exc:
            raise StorageError(describe_error(exc, self.uri)) from None

    def is_dir(self) -> bool:
        try:
            return self.filesystem.get_file_info(self.path).type == _pafs().FileType.Directory
        except OSError as exc:
            raise StorageError(describe_error(exc, self.uri)) from None

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.filesystem.open_input_stream(self.path) as stream:
                return stream.read()

        try:
            return retry_misfiled_transient(read)
        except FileNotFoundError:
            raise StorageError(f"not found: {self.uri}") from None
        except OSError as exc:
            raise StorageError(describe_error(exc, self.uri)) from None

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Whole-object write; local files go through a temp name + rename (atomic)."""
        try:
            if self.is_s3:
                with self.filesystem.open_output_stream(self.path) as out:
                    out.write(data)
                return
            target = Path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageError(describe_error(exc, self.uri)) from None

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def list_files(self, recursive: bool = True) -> list[str]:
        """Paths (filesystem-relative, no scheme) of files under this location, sorted."""
        fs = _pafs()
        try:
            infos = self.filesystem.get_file_info(
                fs.FileSelector(self.path, recursive=recursive, allow_not_found=True)
            )
        except OSError as exc:
            raise StorageError(describe_error(exc, self.uri)) from None
        return sorted(i.path for i in infos if i.type == fs.FileType.File)

    def delete(self) -> None:
        """Remove this file or folder (prefix) if present."""
        file_type = _pafs().FileType
        try:
            info = self.filesystem.get_file_info(self.path)
            if info.type == file_type.Directory:
                self.filesystem.delete_dir(self.path)
            elif info.type == file_type.File:
                self.filesystem.delete_file(self.path)
        except OSError as exc:
            raise StorageError(describe_error(exc, self.uri)) from None

    def uri_for(self, fs_path: str) -> str:
        """The URI of a filesystem path found under this location."""
        return f"s3://{fs_path}" if self.is_s3 else fs_path


def resolve(uri: str) -> Location:
    """Parse a storage URI; bad schemes and empty buckets fail with one clear line."""
    if not uri or not uri.strip():
        raise StorageError("empty storage URI; give a local folder or s3://bucket/prefix")
    if is_s3_uri(uri):
        rest = uri[len("s3://"):].strip("/")
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise StorageError(f"bad URI {uri!r}: no bucket; use s3://bucket/prefix")
        return Location(uri.rstrip("/"), s3_filesystem(), rest)
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(
            f"unsupported URI scheme '{scheme}://' in {uri!r}; use a local path or s3://bucket/prefix"
        )
    path = str(Path(uri).expanduser().absolute())
    return Location(path, _pafs().LocalFileSystem(), path)


def endpoint_label() -> str:
    """The S3 endpoint requests go to, for messages: scheme://host[:port] only (no user
    info, path or query, where a secret could hide)."""
    endpoint = s3_endpoint()
    if not endpoint:
        return f"AWS S3 in {s3_region()}"
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    try:
        port = f":{parsed.port}" if parsed.port else ""
    except ValueError:  # a malformed port: say so rather than echo the string
        port = ":<bad port>"
    host = parsed.hostname or "<no host>"
    return f"{parsed.scheme}://{f'[{host}]' if ':' in host else host}{port}"


# pyarrow/AWS SDK wording for a request that never got an answer from the endpoint
_UNREACHABLE_MARKERS = ("NETWORK_CONNECTION", "Could not connect", "Couldn't connect",
                        "Couldn't resolve host", "Timeout was reached")


def describe_error(exc: OSError, uri: str) -> str:
    """One line for the user about a storage failure: secrets redacted; for S3, the endpoint
    it went to and a hint."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for secret_var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        secret = os.environ.get(secret_var)
        if secret:
            text = text.replace(secret, "***")
    if not is_s3_uri(uri):
        return f"storage error on {uri}: {text}"
    endpoint = endpoint_label()
    if any(marker in text for marker in _UNREACHABLE_MARKERS):
        return (f"cannot reach the S3 endpoint {endpoint} for {uri} (gave up after "
                f"retrying): {text}; check AWS_ENDPOINT_URL_S3 and network access to it")
    if "NoSuchBucket" in text or "does not exist" in text.lower():
        hint = "; create the bucket or fix the URI"
    elif "credential" in text.lower() or "AccessDenied" in text:
        hint = "; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment"
    else:
        hint = "; check AWS_ENDPOINT_URL_S3 / network access to the S3 endpoint"
    return f"storage error on {uri} (S3 endpoint {endpoint}): {text}{hint}"
