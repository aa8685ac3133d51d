"""Who may call a server: loopback by default, an access token for anything wider.

`unclip serve` and `unclip app` bind to 127.0.0.1 unless told otherwise. Bound to any other
address they need `--token-file` (every request to the API must carry
`Authorization: Bearer <token>`; the page asks for it at a login form) or an explicit
`--insecure`. Only the token's SHA-256 travels to the Serve replicas, so the token itself
appears in no deployment argument, log line or error message.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path

MIN_TOKEN_CHARS = 16  # a guessable token is no protection: `openssl rand -hex 32` makes one
TOKEN_USER_HINT = "any user name; the password is the access token"


class AccessError(ValueError):
    """A bind address or token file that would leave a server open or locked by mistake."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Access:
    """What a server checks: `token_digest` None means every request is let in."""

    host: str
    token_digest: str | None = None
    token_file: str | None = None

    def startup_line(self, url: str) -> str:
        if is_loopback(self.host):
            where = f"{url} (loopback: this machine only)"
        else:
            where = f"{url} (bound to {self.host}: reachable from other machines)"
        if self.token_digest:
            return (f"{where}; every request needs the token of {self.token_file} "
                    "(header 'Authorization: Bearer <token>')")
        if is_loopback(self.host):
            return where
        return f"{where} WITHOUT an access token (--insecure)"


def access_for(host: str, token_file: str | None = None, insecure: bool = False) -> Access:
    """The access rule for a server on `host`, checked before anything starts."""
    if token_file is not None:
        token = read_token(token_file)
        return Access(host=host, token_digest=digest(token), token_file=token_file)
    if not is_loopback(host) and not insecure:
        raise AccessError(
            f"--host {host} listens beyond this machine: give --token-file FILE (a token of at "
            f"least {MIN_TOKEN_CHARS} characters, e.g. from `openssl rand -hex 32`) or "
            "--insecure to serve without one")
    return Access(host=host)


def read_token(token_file: str) -> str:
    path = Path(token_file).expanduser()
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise AccessError(f"--token-file {token_file}: cannot read it ({exc.strerror}); "
                          "write the token into that file") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise AccessError(f"--token-file {token_file}: the token must be one word of at least "
                          f"{MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 32 > "
                          f"{token_file}`)")
    return token


def token_matches(token_digest: str, presented: str | None) -> bool:
    """Constant-time comparison of a presented token with the expected digest."""
    return presented is not None and hmac.compare_digest(digest(presented), token_digest)


def bearer_allowed(token_digest: str | None, authorization: str | None) -> bool:
    """Whether an `Authorization` header value lets a request in."""
    if token_digest is None:
        return True
    scheme, _, value = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and token_matches(token_digest, value.strip())


def wait_until_answering(url: str, *, token: str | None = None, timeout_s: float = 300.0,
                         path: str = "/health") -> None:
    """Block until GET url+path answers 200: a server is announced only once it answers."""
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(url + path, headers=headers, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}{path} did not answer within {timeout_s:g} s")
        time.sleep(0.5)
