"""Ray Jobs CLI pieces, mounted into `unclip` by cli.py: `submit`, `jobs list|status|logs|stop`.

Errors a user can fix are raised as `SubmissionError` (printed as one line by the CLI).
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Annotated

import typer

from orchestration.jobs.submission import SubmissionError, default_address

__all__ = ["SUBMIT_CONTEXT_SETTINGS", "SubmissionError", "jobs_app", "register", "submit_command"]

# Everything after `--` (or any option submit does not know) is the job's own command line.
SUBMIT_CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}

jobs_app = typer.Typer(no_args_is_help=True,
                       help="Ray jobs on a cluster: list, status, logs, stop.")

AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or "
    "http://127.0.0.1:8265)")]
JobIdArg = Annotated[str, typer.Argument(help="Submission id, e.g. raysubmit_...")]


def _address(address: str | None) -> str:
    return address or default_address()


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def submit_command(
    ctx: typer.Context,
    address: AddressOpt = None,
    config: Annotated[str | None, typer.Option(
        "--config", "-c", help="Config for the job (validated here; added as --config "
        "unless the command names one)")] = None,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="Stream the job's logs until it ends")] = False,
    forward_secrets: Annotated[bool, typer.Option(
        "--forward-secrets", help="Also pass AWS/MLflow credentials from this environment; "
        "Ray stores them in its job table (Jobs API, dashboard)")] = False,
) -> None:
    """Submit an unclip command to a Ray cluster: unclip submit [--config F] -- pipeline ..."""
    from orchestration.jobs.submission import job_status, submit

    url = _address(address)
    job_id = submit(url, list(ctx.args), config_path=config, wait=wait,
                    forward_secrets=forward_secrets)
    typer.echo(job_id)
    if wait:
        info = job_status(url, job_id)
        typer.echo(f"{job_id}: {info.status} {info.message or ''}".rstrip(), err=True)
        if str(info.status) != "SUCCEEDED":
            raise typer.Exit(1)
    else:
        typer.echo(f"follow it with: unclip jobs logs {job_id} --follow --address {url}",
                   err=True)


@jobs_app.command("list")
def list_command(address: AddressOpt = None) -> None:
    """Every job on the cluster: id, status, start time, command."""
    from orchestration.jobs.submission import list_jobs

    jobs = list_jobs(_address(address))
    if not jobs:
        typer.echo("no jobs", err=True)
    for job in jobs:
        job_id = job.submission_id or job.job_id
        typer.echo(f"{job_id}\t{job.status}\t{_when(job.start_time)}\t{job.entrypoint}")


@jobs_app.command("status")
def status_command(job_id: JobIdArg, address: AddressOpt = None) -> None:
    """Status, message and times of one job (exit code 1 if it failed or was stopped)."""
    from orchestration.jobs.submission import job_status

    info = job_status(_address(address), job_id)
    typer.echo(f"{job_id}: {info.status}")
    if info.message:
        typer.echo(f"  message: {info.message}")
    typer.echo(f"  started: {_when(info.start_time)}  ended: {_when(info.end_time)}")
    typer.echo(f"  command: {info.entrypoint}")
    if str(info.status) in ("FAILED", "STOPPED"):
        raise typer.Exit(1)


@jobs_app.command("logs")
def logs_command(
    job_id: JobIdArg,
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends")]
    = False,
) -> None:
    """The job's driver logs (what its unclip command printed)."""
    from orchestration.jobs.submission import job_logs

    job_logs(_address(address), job_id, follow=follow, out=sys.stdout)


@jobs_app.command("stop")
def stop_command(job_id: JobIdArg, address: AddressOpt = None) -> None:
    """Stop a running job."""
    from orchestration.jobs.submission import stop_job

    stopped = stop_job(_address(address), job_id)
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'already finished'}", err=True)


def register(app: typer.Typer) -> None:
    """Mount `submit` and the `jobs` group on the unclip app."""
    app.command("submit", context_settings=SUBMIT_CONTEXT_SETTINGS)(submit_command)
    app.add_typer(jobs_app, name="jobs")
