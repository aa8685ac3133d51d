"""HTTP serving of a registered pipeline on Ray Serve.

POST / (or /generate) with JSON {"prompt": ..., "num_images", "seed", "prior_guidance",
"decoder_guidance", "sampler", "steps", "eta"} -> JSON with base64 PNGs, or with `?format=png`
one PNG (a grid when num_images > 1). GET /health reports the loaded model.

Each replica pulls the model once, in `__init__`. Concurrent requests are batched with
`@serve.batch`: requests without a seed and with the same options share one `generate` call;
a request with a seed runs as its own call, so its images are reproducible whatever else
arrived with it (the pipeline draws one random stream per call).

Every rejection is a 4xx/5xx JSON `{"error": "<field>: <reason>"}`, decided before any
sampling: a declared Content-Length over the limit is refused before the body is read, and a
body without one is read only up to the limit. A generation that fails fails only its own
requests; one that outlives `request_timeout_s` answers 504. A replica generates for at most
`MAX_IN_FLIGHT` requests at a time and answers 503 beyond that, so the slots it keeps free
let `/health` answer while generation is busy.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import random
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orchestration.common.ray_runtime import connect
from orchestration.registry.pyfunc_model import (
    InvalidRequest,
    check_model_limits,
    check_options,
    check_prompt,
    encode_png,
    generate_kwargs,
)
from orchestration.serve.access import (
    Access,
    access_for,
    bearer_allowed,
    read_token,
    wait_until_answering,
)

MAX_BODY_BYTES = 16 * 1024
MAX_BATCH_SIZE = 8
MAX_IN_FLIGHT = 2 * MAX_BATCH_SIZE  # generation requests per replica; more get 503
HEALTH_SLOTS = 4  # ongoing requests a replica keeps beyond MAX_IN_FLIGHT (/health, 503s)
REQUEST_TIMEOUT_S = 120.0  # per generation request, queueing in the replica included
PROXY_TIMEOUT_MARGIN_S = 30.0  # Serve's proxy gives up this much later, as a backstop
APP_NAME = "unclip"
logger = logging.getLogger("ray.serve")


class RequestRejected(Exception):
    """A request answered with an error status before any sampling."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers

    def response(self) -> JSONResponse:
        return _error(self.status, self.message, self.headers)


@dataclass
class GenerationJob:
    prompt: str
    options: dict = field(default_factory=dict)  # checked; absent means the pipeline default
    deadline: float | None = None  # time.monotonic() after which nobody waits for it

    def group_key(self, index: int) -> tuple:
        if "seed" in self.options:  # seeded: alone, so the seed alone decides the images
            return ("seeded", index)
        return tuple(sorted(self.options.items()))

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def parse_job(body) -> GenerationJob:
    """JSON body -> job, or InvalidRequest naming the field and its limit."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object with a 'prompt'")
    if "prompt" not in body:
        raise InvalidRequest("prompt", "required")
    options = {k: v for k, v in body.items() if k != "prompt"}
    return GenerationJob(prompt=check_prompt(body["prompt"]), options=check_options(options))


def is_json_content_type(value: str | None) -> bool:
    """application/json (or a +json type), any parameters; no header at all is taken as JSON."""
    if not value:
        return True
    mime = value.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/")
                                           and mime.endswith("+json"))


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, at most `limit` bytes: a larger declared Content-Length is refused before
    reading anything, and a body without one (chunked) is read only until it passes `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestRejected(400, f"Content-Length: not a number ({declared[:40]!r})"
                                  ) from None
        if size > limit:
            raise RequestRejected(413, f"body: at most {limit} bytes (Content-Length: {size})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestRejected(413, f"body: at most {limit} bytes (got more)")
    return bytes(body)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def route_path(request: Request) -> str:
    """The path under the app's route prefix, without a trailing slash ("" for the root)."""
    path, root = request.url.path, request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/")


@serve.deployment(ray_actor_options={"num_cpus": 1},
                  max_ongoing_requests=MAX_IN_FLIGHT + HEALTH_SLOTS, max_queued_requests=64)
class UnCLIPServer:
    def __init__(self, model_uri: str, tracking_uri: str | None = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, token_digest: str | None = None):
        import torch

        from models.unclip_pipeline import UnCLIPPipeline
        from orchestration.common.threads import set_torch_threads
        from orchestration.registry.registry import resolve_model_uri

        set_torch_threads()  # the CPUs Ray reserved for this replica (num_cpus), not all cores
        start = time.monotonic()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with tempfile.TemporaryDirectory(prefix="unclip-replica-") as download:
            directory = resolve_model_uri(model_uri, tracking_uri=tracking_uri,
                                          dst_dir=download)
            pipeline = UnCLIPPipeline.load(directory, map_location=device)
        self._serve(pipeline, model_uri, time.monotonic() - start, request_timeout_s,
                    token_digest)

    @classmethod
    def for_pipeline(cls, pipeline, model_uri: str, *,
                     request_timeout_s: float = REQUEST_TIMEOUT_S) -> UnCLIPServer:
        """A server around an already loaded pipeline (no download)."""
        server = cls.__new__(cls)
        server._serve(pipeline, model_uri, 0.0, request_timeout_s)
        return server

    def _serve(self, pipeline, model_uri: str, load_seconds: float,
               request_timeout_s: float, token_digest: str | None = None) -> None:
        self.pipeline, self.model_uri, self.load_seconds = pipeline, model_uri, load_seconds
        self.request_timeout_s = request_timeout_s
        self.token_digest = token_digest  # SHA-256 of the access token; None: no token asked
        self.in_flight = 0  # generation requests admitted and not yet answered

    async def __call__(self, request: Request) -> Response:
        path = route_path(request)
        if not bearer_allowed(self.token_digest, request.headers.get("authorization")):
            return _error(401, "this server needs its access token: send the header "
                               "'Authorization: Bearer <token>'",
                          {"WWW-Authenticate": "Bearer"})
        if path == "/health":
            return JSONResponse({"status": "ok", "model": self.model_uri,
                                 "load_seconds": round(self.load_seconds, 2),
                                 "in_flight": self.in_flight, "max_in_flight": MAX_IN_FLIGHT})
        if path not in ("", "/generate"):
            return _error(404, f"no route {request.url.path}; POST / or GET /health")
        if request.method != "POST":
            return _error(405, "POST a JSON body with a 'prompt'")
        try:
            job, response_format = await self._read_job(request)
        except RequestRejected as exc:
            return exc.response()
        if self.in_flight >= MAX_IN_FLIGHT:
            return _error(503, f"server busy: {self.in_flight} generation requests in progress "
                               f"(at most {MAX_IN_FLIGHT}); retry shortly",
                          {"Retry-After": "1"})
        self.in_flight += 1
        try:
            job.deadline = time.monotonic() + self.request_timeout_s
            result = await asyncio.wait_for(self.generate(job), self.request_timeout_s)
        except TimeoutError:
            return _error(504, f"generation did not finish within {self.request_timeout_s:g} s; "
                               "ask for fewer images or steps, or retry later")
        finally:
            self.in_flight -= 1
        if isinstance(result, GenerationFailed):
            return _error(500, str(result))
        images, batch_size = result
        if response_format == "png":
            return Response(_png_grid(images), media_type="image/png",
                            headers={"X-Num-Images": str(len(images))})
        return JSONResponse({
            "prompt": job.prompt, "seed": job.options.get("seed"),
            "images": [base64.b64encode(encode_png(image)).decode("ascii") for image in images],
            "batch_size": batch_size, "model": self.model_uri})

    async def _read_job(self, request: Request) -> tuple[GenerationJob, str]:
        """The checked job and response format, or RequestRejected with the reason."""
        content_type = request.headers.get("content-type")
        if not is_json_content_type(content_type):
            raise RequestRejected(415, f"Content-Type: send application/json (got "
                                       f"{content_type[:60]!r})")
        response_format = request.query_params.get("format", "json")
        if response_format not in ("json", "png"):
            raise RequestRejected(422, f"format: must be json or png (got {response_format!r})")
        raw = await read_body(request)
        try:
            body = json.loads(raw or b"null")
        except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
            raise RequestRejected(400, "body: not valid JSON") from None
        try:
            job = parse_job(body)
            check_model_limits(self.pipeline, job.options)
        except InvalidRequest as exc:
            raise RequestRejected(422, str(exc)) from None
        return job, response_format

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=0.05)
    async def generate(self, jobs: list[GenerationJob]) -> list[tuple]:
        # Diffusion sampling is CPU/GPU-bound: keep the event loop free for /health.
        return await asyncio.to_thread(self._generate_batch, jobs)

    def _generate_batch(self, jobs: list[GenerationJob]) -> list:
        """Per job: (uint8 images [num_images, H, W, 3], how many jobs shared its call), or
        a GenerationFailed (returned, not raised: raising would fail the whole batch). A
        failed shared call is retried job by job, so one bad request fails only itself; a
        group nobody waits for any more is skipped."""
        groups: dict[tuple, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.group_key(index), []).append(index)
        results: list = [None] * len(jobs)
        for members in groups.values():
            if all(jobs[i].expired() for i in members):
                for index in members:
                    results[index] = GenerationFailed("expired before it started")
                continue
            try:
                self._generate_group(jobs, members, results)
            except Exception:
                if len(members) == 1:
                    logger.exception("generation failed for one request")
                    results[members[0]] = GenerationFailed.default()
                    continue
                for index in members:
                    try:
                        self._generate_group(jobs, [index], results)
                    except Exception:
                        logger.exception("generation failed for one request of a batch")
                        results[index] = GenerationFailed.default()
        return results

    def _generate_group(self, jobs: list[GenerationJob], members: list[int],
                        results: list) -> None:
        options = dict(jobs[members[0]].options)
        options.setdefault("seed", random.randrange(2**31))
        per_prompt = options.get("num_images", 1)
        images = self.pipeline.generate([jobs[i].prompt for i in members],
                                        **generate_kwargs(options))
        for slot, index in enumerate(members):
            results[index] = (images[slot * per_prompt:(slot + 1) * per_prompt], len(members))


class GenerationFailed(Exception):
    """Sampling raised for this request; the replica log has the traceback."""

    @classmethod
    def default(cls) -> GenerationFailed:
        # The exception's own text stays in the log: it may hold paths or internals.
        return cls("generation failed on the server (its log has the details); "
                   "retry, or report it if it persists")


def _png_grid(images) -> bytes:
    from models.unclip_pipeline import images_to_grid

    buffer = io.BytesIO()
    images_to_grid(images, nrow=len(images)).save(buffer, format="PNG")
    return buffer.getvalue()


def build_app(model_uri: str, *, tracking_uri: str | None = None, num_replicas: int = 1,
              num_cpus: float = 1.0, num_gpus: float = 0.0,
              request_timeout_s: float = REQUEST_TIMEOUT_S, token_digest: str | None = None):
    # A relative local path would resolve against the replica's working directory.
    local = Path(model_uri).expanduser()
    if "://" not in model_uri and not model_uri.startswith(("models:", "runs:")):
        model_uri = str(local.absolute())
    return UnCLIPServer.options(num_replicas=num_replicas,
                                ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}
                                ).bind(model_uri, tracking_uri, request_timeout_s, token_digest)


def run_server(model_uri: str, *, tracking_uri: str | None = None, host: str = "127.0.0.1",
               port: int = 8000, num_replicas: int = 1, num_cpus: float = 1.0,
               num_gpus: float = 0.0, blocking: bool = True,
               request_timeout_s: float = REQUEST_TIMEOUT_S, access: Access | None = None,
               on_ready=None) -> str:
    """Start Serve on host:port (loopback by default) and deploy; returns the base URL.

    The model URI and the access rule are checked first (an unknown model, version or alias,
    or a wide bind address without a token, is one line before Ray or Serve start). Connects
    to Ray first if nothing has (RAY_ADDRESS or a local instance). `on_ready(url)` is called
    once /health answers. With blocking, serves until Ctrl-C or SIGTERM, then stops Serve.
    """
    from orchestration.registry.registry import check_model_uri

    access = access or access_for(host)
    check_model_uri(model_uri, tracking_uri=tracking_uri)
    connect()  # no-op when already connected
    if blocking:
        exit_on_sigterm()
    serve.start(http_options={"host": host, "port": port,
                              "request_timeout_s": request_timeout_s + PROXY_TIMEOUT_MARGIN_S})
    serve.run(build_app(model_uri, tracking_uri=tracking_uri, num_replicas=num_replicas,
                        num_cpus=num_cpus, num_gpus=num_gpus, request_timeout_s=request_timeout_s,
                        token_digest=access.token_digest), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    announce_when_answering(url, access, on_ready)
    if blocking:
        serve_until_stopped()
    return url


def announce_when_answering(url: str, access: Access, on_ready) -> None:
    """Call `on_ready(url)` once GET /health answers through the proxy (it answers some
    seconds after the deployment is up), probing a wildcard bind address on loopback."""
    if on_ready is None:
        return
    host, _, port = url.removeprefix("http://").rpartition(":")
    probe = f"http://127.0.0.1:{port}" if host in ("0.0.0.0", "::", "[::]") else url
    token = read_token(access.token_file) if access.token_file else None
    wait_until_answering(probe, token=token)
    on_ready(url)


def _raise_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)  # 143, as the CLI's own handler does


def exit_on_sigterm() -> None:
    """From now on SIGTERM unwinds like Ctrl-C (SystemExit(143)), so `finally` stops Serve and
    the exit handlers stop a local Ray instance.

    Call it after connecting to Ray: `ray.init` replaces the CLI's handler, and Ray's core
    worker adds a native one that prints a stack and arms an abort 3 s later (abseil's
    failure-signal alarm). That abort used to kill the process with signal 6 in the middle of
    its shutdown, leaving the local instance's dashboard and agents running. A Python handler
    set afterwards replaces both. Only the main thread can set handlers; elsewhere a no-op."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_exit)


def serve_until_stopped() -> None:
    """Block until Ctrl-C or SIGTERM (SystemExit(143)), then stop Serve."""
    exit_on_sigterm()
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
