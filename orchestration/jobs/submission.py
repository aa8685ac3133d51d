"""Ray Jobs submission: run an `unclip` command on a cluster, shipping this repo as working_dir.

The job runs `python -m orchestration.cli <args>` in an unpacked copy of the repo, so the code on
the cluster is exactly the code here. Storage and MLflow settings travel as runtime_env env_vars
(names printed, values never). Token-authenticated clusters get the bearer token from
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, the places Ray itself reads.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from orchestration.config import load_config, resolve_config_path

REPO_ROOT = Path(__file__).resolve().parents[2]  # orchestration/jobs/ -> the repository
DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# Storage and MLflow settings a job needs on the cluster: where things are, always passed.
SETTINGS_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
                "MLFLOW_TRACKING_URI")
# Credentials: passed only with --forward-secrets. Ray keeps a job's runtime_env in its job
# table, where the Jobs API and the dashboard show it, so by default a cluster uses its own
# credentials (instance profiles, the node environment file of cluster.yaml).
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
PASSTHROUGH_ENV = SETTINGS_ENV + SECRET_ENV

# Never uploaded: environments, datasets, outputs and local tracking stores (gitwildmatch
# patterns; the leading slash anchors to the repo root so data_pipelines/ still ships).
WORKING_DIR_EXCLUDES = [
    ".venv", "venv", ".git", "/data", "/runs", "/outputs", "/seeds", "mlruns", "mlartifacts",
    "mlflow.db", "ray_results", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
    ".ruff_cache", "build",
]

CONFIG_FLAGS = ("--config", "-c")


class SubmissionError(ValueError):
    """A submission problem, phrased as one line a user can act on."""


def default_address() -> str:
    # Same order as `ray job submit`: the API server address, then RAY_ADDRESS.
    return (os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or DEFAULT_ADDRESS)


def auth_token() -> str | None:
    """The cluster's auth token, looked up like Ray does; None when auth is switched off."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidate = Path(path).expanduser() if path else Path.home() / ".ray" / "auth_token"
    if candidate.is_file():
        return candidate.read_text().strip() or None
    if path:
        raise SubmissionError(f"RAY_AUTH_TOKEN_PATH={path}: no such file")
    return None


def _client(address: str):
    # Ray 2.60's client adds the token only when RAY_AUTH_MODE=token is set in *this* process;
    # sending the header ourselves also covers clusters that turned token auth on by default.
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except ConnectionError:
        raise SubmissionError(
            f"cannot reach a Ray dashboard at {address}; start one (ray start --head, "
            "ray up cluster.yaml + ray dashboard cluster.yaml) or pass --address") from None
    except AuthenticationError:
        raise SubmissionError(_auth_hint(address, token)) from None


def _auth_hint(address: str, token: str | None) -> str:
    problem = "rejected the Ray auth token" if token else "requires a Ray auth token"
    return (f"the cluster at {address} {problem}; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
            "(on the head node: ray get-auth-token)")


def _call(address: str, action: Callable):
    """Run one Jobs API call, turning Ray's HTTP errors into one-line SubmissionErrors."""
    from ray.exceptions import AuthenticationError

    try:
        return action(_client(address))
    except AuthenticationError:
        raise SubmissionError(_auth_hint(address, auth_token())) from None
    except RuntimeError as exc:
        text = str(exc)
        if "404" in text or "does not exist" in text:
            raise SubmissionError(f"no such job on {address} ({text.splitlines()[0]})") from None
        raise SubmissionError(f"Ray Jobs API at {address}: {text.splitlines()[0]}") from None


def _option_values(args: list[str], flags: Iterable[str]) -> list[str]:
    values, flags = [], tuple(flags)
    for i, arg in enumerate(args):
        if arg in flags and i + 1 < len(args):
            values.append(args[i + 1])
        for flag in flags:
            if flag.startswith("--") and arg.startswith(flag + "="):
                values.append(arg.partition("=")[2])
    return values


def _relative_config(path: str, working_dir: Path) -> str:
    resolved = resolve_config_path(path).resolve()
    try:
        return resolved.relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise SubmissionError(
            f"config {path} is outside the working dir {working_dir}, so it would not reach "
            "the cluster; copy it into the repo (e.g. configs/)") from None


def _rewrite_config_args(args: list[str], working_dir: Path) -> list[str]:
    """Point every --config at the shipped copy (the job's cwd is the working_dir)."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg in CONFIG_FLAGS and i + 1 < len(out):
            out[i + 1] = _relative_config(out[i + 1], working_dir)
        elif arg.startswith("--config="):
            out[i] = "--config=" + _relative_config(arg.partition("=")[2], working_dir)
    return out


def prepare_args(args: list[str], config_path: str | None = None,
                 working_dir: Path = REPO_ROOT) -> tuple[list[str], list[str]]:
    """(the job's unclip args, warnings). Validates the config here, before any submission."""
    args = list(args)
    if args and args[0] == "unclip":  # tolerate `unclip submit -- unclip pipeline ...`
        args = args[1:]
    if not args:
        raise SubmissionError("nothing to run: put the unclip command after --, e.g. "
                              "unclip submit --config configs/tiny.yaml -- pipeline")
    if config_path and not _option_values(args, CONFIG_FLAGS):
        args += ["--config", config_path]
    args = _rewrite_config_args(args, working_dir)
    configs = _option_values(args, CONFIG_FLAGS)
    overrides = _option_values(args, ("--set",))
    warnings: list[str] = []
    if configs or overrides:
        config_file = str(working_dir / configs[-1]) if configs else None
        config = load_config(config_file, overrides, absolute_paths=False)
        warnings = _local_path_warnings(config)
    return args, warnings


def _local_path_warnings(config) -> list[str]:
    # Relative paths resolve inside the job's unpacked working_dir copy, which Ray deletes.
    notes = [f"{key}={value} is a relative local path: on the cluster it resolves inside "
             "the job's temporary working_dir copy; use s3:// or an absolute shared path"
             for key, value in (("data.uri", config.data.uri),
                                ("storage_root", config.storage_root))
             if _is_relative_local(value)]
    uri = config.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        notes.append(f"mlflow.tracking_uri={uri} is relative: runs would vanish with the job's "
                     "working_dir; use an MLflow server (http://...) or an absolute path")
    return notes


def _is_relative_local(uri: str) -> bool:
    return "://" not in uri and not Path(uri).expanduser().is_absolute()


def entrypoint_for(args: list[str]) -> str:
    return shlex.join(["python", "-m", "orchestration.cli", *args])


def runtime_env_for(working_dir: Path = REPO_ROOT,
                    env_passthrough: Iterable[str] = SETTINGS_ENV) -> dict:
    env_vars = {name: os.environ[name] for name in env_passthrough if os.environ.get(name)}
    from orchestration.common.quiet_logs import SETUP_HOOK

    return {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES),
            "env_vars": env_vars, "worker_process_setup_hook": SETUP_HOOK}


def submit(address: str, entrypoint_args: list[str], *, config_path: str | None = None,
           working_dir: str | Path = REPO_ROOT, forward_secrets: bool = False,
           wait: bool = False, echo: Callable[[str], None] | None = None,
           out=None) -> str:
    """Submit `unclip <entrypoint_args>` as a Ray job; returns the submission id.

    With `wait`, streams the job's logs to `out` until it ends; `job_status` tells the outcome.
    `echo` receives progress lines (stderr by default); secrets are only ever named, and
    their values leave this machine only with `forward_secrets`.
    """
    echo = echo or (lambda line: print(line, file=sys.stderr))
    env_passthrough = SETTINGS_ENV + (SECRET_ENV if forward_secrets else ())
    held_back = sorted(n for n in SECRET_ENV if os.environ.get(n) and not forward_secrets)
    if held_back:
        echo(f"not passing {', '.join(held_back)}: the cluster uses its own credentials "
             "(--forward-secrets passes them)")
    if forward_secrets:
        echo("warning: --forward-secrets stores these values in the Ray cluster's job table, "
             "where the Jobs API and the dashboard show them to anyone who can reach it")
    working_dir = Path(working_dir)
    args, warnings = prepare_args(entrypoint_args, config_path, working_dir)
    for note in warnings:
        echo(f"warning: {note}")
    runtime_env = runtime_env_for(working_dir, env_passthrough)
    passed = sorted(runtime_env["env_vars"])
    echo(f"passing {', '.join(passed)} to the job" if passed
         else "passing no storage/MLflow environment variables to the job")
    entrypoint = entrypoint_for(args)
    job_id = _call(address, lambda client: client.submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env, metadata={"unclip_command": args[0]}))
    echo(f"submitted {job_id} to {address}: {shlex.join(['unclip', *args])}")
    if wait:
        job_logs(address, job_id, follow=True, out=out)
    return job_id


def list_jobs(address: str) -> list:
    """JobDetails for every job the cluster knows, oldest first."""
    jobs = _call(address, lambda client: client.list_jobs())
    return sorted(jobs, key=lambda job: job.start_time or 0)


def job_status(address: str, job_id: str):
    """The job's JobInfo (status, message, start/end times, entrypoint)."""
    return _call(address, lambda client: client.get_job_info(job_id))


def job_logs(address: str, job_id: str, *, follow: bool = False, out=None) -> str:
    """Write the job's logs to `out` (stdout by default); with `follow`, until the job ends."""
    out = out or sys.stdout
    if not follow:
        text = _call(address, lambda client: client.get_job_logs(job_id))
        out.write(text)
        return text
    chunks: list[str] = []

    async def tail(client) -> None:
        async for chunk in client.tail_job_logs(job_id):
            chunks.append(chunk)
            out.write(chunk)
            out.flush()

    def follow_logs(client) -> None:
        client.get_job_status(job_id)  # an unknown id fails here, with a clear message
        asyncio.run(tail(client))

    _call(address, follow_logs)
    return "".join(chunks)


def stop_job(address: str, job_id: str) -> bool:
    """Ask the cluster to stop the job; False if it had already ended."""
    return _call(address, lambda client: client.stop_job(job_id))


def wait_for_job(address: str, job_id: str, *, timeout_s: float | None = None,
                 poll_s: float = 1.0):
    """Poll until the job reaches a terminal status; returns that JobStatus."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = _call(address, lambda client: client.get_job_status(job_id))
        if status.is_terminal():
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise SubmissionError(f"job {job_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)
