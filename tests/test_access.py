"""Who may call `unclip serve` / `unclip app`: loopback by default, a token for wider binds.

The HTTP and browser side (401 without the token, images with it) is in test_web_app.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestration.serve.access import (
    AccessError,
    access_for,
    bearer_allowed,
    digest,
    is_loopback,
)

TOKEN = "f" * 16 + "0123456789abcdef"


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("192.168.1.4", False),
    ("myhost.example", False)])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_loopback_needs_no_token_and_a_wide_bind_needs_one(tmp_path):
    assert access_for("127.0.0.1").token_digest is None
    with pytest.raises(AccessError) as refused:
        access_for("0.0.0.0")
    assert str(refused.value).startswith("--host 0.0.0.0 listens beyond this machine: give "
                                         "--token-file FILE")
    insecure = access_for("0.0.0.0", insecure=True)
    assert insecure.token_digest is None
    assert insecure.startup_line("http://0.0.0.0:8000/") == (
        "http://0.0.0.0:8000/ (bound to 0.0.0.0: reachable from other machines) WITHOUT an "
        "access token (--insecure)")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    wide = access_for("0.0.0.0", str(token_file))
    assert wide.token_digest == digest(TOKEN)
    assert TOKEN not in wide.startup_line("http://0.0.0.0:8000/")
    assert TOKEN not in repr(wide)


@pytest.mark.parametrize(("content", "reason"), [
    (None, "cannot read it"), ("short", "at least 16 characters"),
    ("two words of a token", "one word")])
def test_bad_token_files_are_one_line_without_the_token(tmp_path, content, reason):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AccessError) as refused:
        access_for("0.0.0.0", str(path))
    message = str(refused.value)
    assert message.startswith(f"--token-file {path}") and reason in message
    assert "\n" not in message and (content is None or content not in message)


def test_bearer_header_check():
    expected = digest(TOKEN)
    assert bearer_allowed(None, None)
    assert bearer_allowed(expected, f"Bearer {TOKEN}")
    assert bearer_allowed(expected, f"bearer  {TOKEN} ")
    for header in (None, "", TOKEN, f"Basic {TOKEN}", "Bearer " + "0" * 32, f"Bearer {expected}"):
        assert not bearer_allowed(expected, header), header


@pytest.mark.parametrize("command", ["serve", "app"])
def test_cli_refuses_a_wide_bind_without_token_before_ray(command):
    """One line and exit 2: nothing else printed, so no Ray instance was started."""
    result = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", command, "--model", "release/shapes",
         "--host", "0.0.0.0", "--port", "18123"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --host 0.0.0.0 listens beyond this machine: give --token-file FILE (a token of "
        "at least 16 characters, e.g. from `openssl rand -hex 32`) or --insecure to serve "
        "without one"]
