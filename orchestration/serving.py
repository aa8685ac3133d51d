"""HTTP serving of a registered pipeline on Ray Serve.

POST / (or /generate) with JSON {"prompt": ..., "num_images", "seed", "prior_guidance",
"decoder_guidance", "sampler", "steps", "eta"} -> JSON with base64 PNGs, or with `?format=png`
one PNG (a grid when num_images > 1). GET /health reports the loaded model.

Each replica pulls the model once, in `__init__`. Concurrent requests are batched with
`@serve.batch`: requests without a seed and with the same options share one `generate` call;
a request with a seed runs as its own call, so its images are reproducible whatever else
arrived with it (the pipeline draws one random stream per call).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orchestration.pyfunc_model import (
    InvalidRequest,
    check_model_limits,
    check_options,
    check_prompt,
    encode_png,
    generate_kwargs,
)
from orchestration.ray_runtime import connect

MAX_BODY_BYTES = 16 * 1024
MAX_BATCH_SIZE = 8
APP_NAME = "unclip"


@dataclass
class GenerationJob:
    prompt: str
    options: dict = field(default_factory=dict)  # checked; absent means the pipeline default

    def group_key(self, index: int) -> tuple:
        if "seed" in self.options:  # seeded: alone, so the seed alone decides the images
            return ("seeded", index)
        return tuple(sorted(self.options.items()))


def parse_job(body) -> GenerationJob:
    """JSON body -> job, or InvalidRequest naming the field and its limit."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object with a 'prompt'")
    if "prompt" not in body:
        raise InvalidRequest("prompt", "required")
    options = {k: v for k, v in body.items() if k != "prompt"}
    return GenerationJob(prompt=check_prompt(body["prompt"]), options=check_options(options))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=2 * MAX_BATCH_SIZE,
                  max_queued_requests=64)
class UnCLIPServer:
    def __init__(self, model_uri: str, tracking_uri: str | None = None):
        import torch

        from models.unclip_pipeline import UnCLIPPipeline
        from orchestration.registry import resolve_model_uri

        start = time.monotonic()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with tempfile.TemporaryDirectory(prefix="unclip-replica-") as download:
            directory = resolve_model_uri(model_uri, tracking_uri=tracking_uri,
                                          dst_dir=download)
            self.pipeline = UnCLIPPipeline.load(directory, map_location=device)
        self.model_uri = model_uri
        self.load_seconds = time.monotonic() - start

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if path == "/health":
            return JSONResponse({"status": "ok", "model": self.model_uri,
                                 "load_seconds": round(self.load_seconds, 2)})
        if path not in ("", "/generate"):
            return _error(404, f"no route {request.url.path}; POST / or GET /health")
        if request.method != "POST":
            return _error(405, "POST a JSON body with a 'prompt'")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return _error(413, f"body: at most {MAX_BODY_BYTES} bytes (got {len(raw)})")
        response_format = request.query_params.get("format", "json")
        if response_format not in ("json", "png"):
            return _error(422, f"format: must be json or png (got {response_format!r})")
        try:
            job = parse_job(json.loads(raw or b"null"))
            check_model_limits(self.pipeline, job.options)
        except ValueError as exc:  # JSONDecodeError and InvalidRequest are both ValueErrors
            status = 422 if isinstance(exc, InvalidRequest) else 400
            return _error(status, str(exc) if status == 422 else "body: not valid JSON")
        images, batch_size = await self.generate(job)
        if response_format == "png":
            return Response(_png_grid(images), media_type="image/png",
                            headers={"X-Num-Images": str(len(images))})
        return JSONResponse({
            "prompt": job.prompt, "seed": job.options.get("seed"),
            "images": [base64.b64encode(encode_png(image)).decode("ascii") for image in images],
            "batch_size": batch_size, "model": self.model_uri})

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=0.05)
    async def generate(self, jobs: list[GenerationJob]) -> list[tuple]:
        # Diffusion sampling is CPU/GPU-bound: keep the event loop free for /health.
        return await asyncio.to_thread(self._generate_batch, jobs)

    def _generate_batch(self, jobs: list[GenerationJob]) -> list[tuple]:
        """Per job: (uint8 images [num_images, H, W, 3], how many jobs shared its call)."""
        groups: dict[tuple, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.group_key(index), []).append(index)
        results: list = [None] * len(jobs)
        for members in groups.values():
            options = dict(jobs[members[0]].options)
            options.setdefault("seed", random.randrange(2**31))
            per_prompt = options.get("num_images", 1)
            images = self.pipeline.generate([jobs[i].prompt for i in members],
                                            **generate_kwargs(options))
            for slot, index in enumerate(members):
                results[index] = (images[slot * per_prompt:(slot + 1) * per_prompt],
                                  len(members))
        return results


def _png_grid(images) -> bytes:
    from models.unclip_pipeline import images_to_grid

    buffer = io.BytesIO()
    images_to_grid(images, nrow=len(images)).save(buffer, format="PNG")
    return buffer.getvalue()


def build_app(model_uri: str, *, tracking_uri: str | None = None, num_replicas: int = 1,
              num_cpus: float = 1.0, num_gpus: float = 0.0):
    # A relative local path would resolve against the replica's working directory.
    local = Path(model_uri).expanduser()
    if "://" not in model_uri and not model_uri.startswith(("models:", "runs:")):
        model_uri = str(local.absolute())
    return UnCLIPServer.options(num_replicas=num_replicas,
                                ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}
                                ).bind(model_uri, tracking_uri)


def run_server(model_uri: str, *, tracking_uri: str | None = None, host: str = "127.0.0.1",
               port: int = 8000, num_replicas: int = 1, num_cpus: float = 1.0,
               num_gpus: float = 0.0, blocking: bool = True) -> str:
    """Start Serve on host:port (loopback by default) and deploy; returns the base URL.

    Connects to Ray first if nothing has (RAY_ADDRESS or a local instance). With blocking,
    serves until Ctrl-C and then shuts Serve down.
    """
    connect()  # no-op when already connected
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(model_uri, tracking_uri=tracking_uri, num_replicas=num_replicas,
                        num_cpus=num_cpus, num_gpus=num_gpus), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    if blocking:
        serve_until_stopped()
    return url


def serve_until_stopped() -> None:
    """Block until Ctrl-C or SIGTERM (the CLI turns it into SystemExit), then stop Serve."""
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
