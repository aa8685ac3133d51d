"""Ray Serve app from the registry, over real HTTP on loopback (tiny model, 2-3 steps)."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import mlflow
import numpy as np
import psutil
import pytest
import requests
from PIL import Image
from test_registry import IMAGE_SIZE, LINEAGE, free_port, save_tiny_pipeline

from orchestration.registry.registry import promote, register_pipeline
from orchestration.serve.serving import MAX_BODY_BYTES, MAX_IN_FLIGHT, GenerationJob, UnCLIPServer

MODEL = "unclip-serving"
TIMEOUT = 120


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    from orchestration.serve.serving import run_server

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("serving", artifact_location=str(root / "art"))
    with mlflow.start_run(experiment_id=experiment_id) as run:
        version = register_pipeline(save_tiny_pipeline(root / "pipeline"), tracking_uri=uri,
                                    model_name=MODEL, metrics={"eval/fd_clip": 1.0},
                                    parent_run_id=run.info.run_id, **LINEAGE)
    promote(MODEL, version, tracking_uri=uri)
    url = run_server(f"models:/{MODEL}@champion", tracking_uri=uri, port=free_port(),
                     blocking=False)
    assert url.startswith("http://127.0.0.1:")
    yield url
    serve.shutdown()


def serve_process_pids() -> dict[str, int]:
    """Pids of the replica and the HTTP proxy of this test's Serve instance."""
    import ray
    from ray.util.state import list_actors

    pids = {}
    # The address: other Ray instances on the machine would make "auto" ambiguous.
    for actor in list_actors(address=ray.get_runtime_context().gcs_address,
                             filters=[("state", "=", "ALIVE")], limit=1000):
        if actor.class_name == "ServeReplica:unclip:UnCLIPServer":
            pids["replica"] = actor.pid
        elif actor.class_name == "ProxyActor":
            pids["proxy"] = actor.pid
    assert set(pids) == {"replica", "proxy"}, pids
    return pids


def pngs(response) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    return [Image.open(io.BytesIO(base64.b64decode(text))) for text in response.json()["images"]]


def test_health(server):
    response = requests.get(f"{server}/health", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["model"] == f"models:/{MODEL}@champion"


def test_generate_returns_pngs_and_seed_reproduces(server):
    body = {"prompt": "a red circle", "num_images": 2, "seed": 5, "steps": 2,
            "decoder_guidance": 3.0, "prior_guidance": 1.0, "sampler": "ddim"}
    first = requests.post(server, json=body, timeout=TIMEOUT)
    images = pngs(first)
    assert len(images) == 2
    assert all(i.format == "PNG" and i.size == (IMAGE_SIZE, IMAGE_SIZE) for i in images)
    again = requests.post(f"{server}/generate", json=body, timeout=TIMEOUT)
    assert again.json()["images"] == first.json()["images"]
    raw = requests.post(f"{server}/?format=png", json={**body, "sampler": "ddpm"},
                        timeout=TIMEOUT)
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    grid = Image.open(io.BytesIO(raw.content))
    assert grid.size == (2 * IMAGE_SIZE, IMAGE_SIZE) and raw.headers["x-num-images"] == "2"


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"prompt": "x" * 201}, 422, "prompt: at most 200 characters (got 201)"),
    ({"prompt": ""}, 422, "prompt: must be a non-empty string"),
    ({"num_images": 2}, 422, "prompt: required"),
    ({"prompt": "a", "num_images": 9}, 422, "num_images: must be between 1 and 8 (got 9)"),
    ({"prompt": "a", "steps": 0}, 422, "steps: must be between 1 and 1000 (got 0)"),
    ({"prompt": "a", "steps": 2.5}, 422, "steps: must be an integer"),
    ({"prompt": "a", "steps": 21}, 422, "steps: at most 20 for this model, whose decoder has "
                                         "20 timesteps (got 21)"),
    ({"prompt": "a", "decoder_guidance": 25}, 422, "decoder_guidance: must be between 0.0 and"),
    ({"prompt": "a", "sampler": "euler"}, 422, "sampler: must be one of ddpm, ddim"),
    ({"prompt": "a", "colour": "red"}, 422, "colour: unknown option"),
    (["a red circle"], 422, "body: must be a JSON object"),
    # JSON's "\ud800" is a lone surrogate: no response could echo it back as UTF-8
    ({"prompt": "a \ud800 circle"}, 422, "prompt: must be valid Unicode text (a lone "
                                          "surrogate at character 2)"),
])
def test_bad_requests_get_4xx_with_reason(server, body, status, message):
    response = requests.post(server, json=body, timeout=TIMEOUT)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_malformed_and_misrouted_requests(server):
    not_json = requests.post(server, data=b"{prompt", timeout=TIMEOUT)
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]
    huge = requests.post(server, data=b"x" * 20000, timeout=TIMEOUT)
    assert huge.status_code == 413
    assert huge.json()["error"] == "body: at most 16384 bytes (Content-Length: 20000)"
    assert requests.get(server, timeout=TIMEOUT).status_code == 405
    jpeg = requests.post(f"{server}/?format=jpeg", json={"prompt": "a"}, timeout=TIMEOUT)
    assert jpeg.status_code == 422 and "format: must be json or png" in jpeg.json()["error"]
    assert requests.post(f"{server}/nope", json={"prompt": "a"}, timeout=TIMEOUT
                         ).status_code == 404


def test_concurrent_burst_is_batched_and_all_succeed(server):
    body = {"prompt": "a blue square", "steps": 2}  # no seed: batchable with each other

    def post(index: int):
        return requests.post(server, json={**body, "prompt": f"shape {index}"}, timeout=TIMEOUT)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(post, range(8)))
    for index, response in enumerate(responses):
        assert len(pngs(response)) == 1
        assert response.json()["prompt"] == f"shape {index}"
    assert max(r.json()["batch_size"] for r in responses) > 1


def test_wrong_content_type_is_415_with_reason(server):
    body = b'{"prompt": ""}'  # accepted types get as far as the prompt check (422)
    for content_type in ("text/plain", "application/x-www-form-urlencoded",  # curl -d
                         "multipart/form-data; boundary=x"):
        response = requests.post(server, data=body, headers={"Content-Type": content_type},
                                 timeout=TIMEOUT)
        assert response.status_code == 415
        assert response.json()["error"] == (f"Content-Type: send application/json (got "
                                             f"{content_type!r})")
    for content_type in ("application/json; charset=utf-8", "application/problem+json", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = requests.post(server, data=body, headers=headers, timeout=TIMEOUT)
        assert response.status_code == 422, (content_type, response.text)
    not_text = requests.post(server, data=b"\xff\xfe{", timeout=TIMEOUT)
    assert (not_text.status_code, not_text.json()) == (400, {"error": "body: not valid JSON"})


def test_oversized_body_is_refused_before_it_is_read(server):
    """A declared Content-Length over the limit is answered at once: the client never sends
    the body. A body without one (chunked) is cut off once it passes the limit."""
    url = urlparse(server)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 50000000\r\n\r\n")  # ... and no body at all
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'{"error":"body: at most 16384 bytes (Content-Length: 50000000)"}' in reply

    def chunks():  # requests sends a generator chunked, without a Content-Length
        for _ in range(64):
            yield b"x" * 1024

    chunked = requests.post(server, data=chunks(), timeout=TIMEOUT,
                            headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    assert chunked.json()["error"] == f"body: at most {MAX_BODY_BYTES} bytes (got more)"


def test_requests_have_a_time_limit(server):
    """The same deployment under a second route with a tiny time limit: a generation that
    outlives it answers 504 with a reason, and /health under that route still answers."""
    from ray import serve

    from orchestration.serve.serving import build_app

    app = build_app(f"models:/{MODEL}@champion", tracking_uri=mlflow.get_tracking_uri(),
                    num_cpus=0, request_timeout_s=0.01)
    serve.run(app, name="unclip-strict", route_prefix="/strict")
    try:
        late = requests.post(f"{server}/strict/generate", json={"prompt": "a red circle",
                                                                 "steps": 20, "num_images": 4},
                             timeout=TIMEOUT)
        assert late.status_code == 504
        assert late.json()["error"] == ("generation did not finish within 0.01 s; ask for "
                                        "fewer images or steps, or retry later")
        assert requests.get(f"{server}/strict/health", timeout=TIMEOUT).json()["status"] == "ok"
    finally:
        serve.delete("unclip-strict")


def test_health_answers_while_generation_is_busy(server):
    heavy = [{"prompt": f"shape {i}", "seed": i, "num_images": 8, "steps": 20} for i in range(6)]
    with ThreadPoolExecutor(max_workers=len(heavy)) as pool:
        pending = [pool.submit(requests.post, server, json=body, timeout=TIMEOUT)
                   for body in heavy]
        busy_answers = []
        deadline = time.monotonic() + 60
        while not busy_answers and time.monotonic() < deadline:
            start = time.monotonic()
            health = requests.get(f"{server}/health", timeout=TIMEOUT).json()
            if health["in_flight"] and not all(f.done() for f in pending):
                busy_answers.append(time.monotonic() - start)
            time.sleep(0.05)
        statuses = [future.result().status_code for future in pending]
    assert busy_answers, "no /health answer came back while generation was in progress"
    assert busy_answers[0] < 2.0
    assert statuses == [200] * len(heavy)


def test_bounded_bursts_are_served_or_rejected_and_memory_stays_flat(server):
    """Bursts of 3x MAX_IN_FLIGHT concurrent requests on loopback: each is served (200) or
    refused with a reason (503), never dropped; the server's memory does not grow."""
    burst = 3 * MAX_IN_FLIGHT
    pids = serve_process_pids()

    def post(index: int):
        return requests.post(server, json={"prompt": f"shape {index}", "steps": 2},
                             timeout=TIMEOUT)

    def run_burst() -> list[int]:
        with ThreadPoolExecutor(max_workers=burst) as pool:
            responses = list(pool.map(post, range(burst)))
        for response in responses:
            assert response.status_code in (200, 503), (response.status_code, response.text)
            if response.status_code == 503 and response.headers.get(
                    "content-type") == "application/json":
                assert response.json()["error"].startswith("server busy: ")
                assert response.headers["retry-after"] == "1"
        return [r.status_code for r in responses]

    def rss() -> int:
        return sum(psutil.Process(pid).memory_info().rss for pid in pids.values())

    statuses = run_burst()  # warm-up: allocator pools, batch queue, connection handling
    assert statuses.count(200) >= MAX_IN_FLIGHT // 2
    baseline = rss()
    after = []
    for _ in range(3):
        statuses = run_burst()
        assert 200 in statuses
        after.append(rss())
    print(f"burst of {burst}: {statuses.count(200)} served, {statuses.count(503)} refused; "
          f"RSS {baseline / 2**20:.0f} MiB after warm-up, then "
          f"{', '.join(f'{r / 2**20:.0f}' for r in after)} MiB")
    assert max(after) <= 1.10 * baseline, (baseline, after)


class FakePipeline:
    """Stands in for UnCLIPPipeline: fails any call that holds the prompt "boom"."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def generate(self, prompts, num_images_per_prompt=1, **kwargs):
        self.calls.append(list(prompts))
        if "boom" in prompts:
            raise RuntimeError("sampling blew up (internal detail)")
        return np.zeros((len(prompts) * num_images_per_prompt, 4, 4, 3), np.uint8)


def test_one_bad_request_in_a_batch_fails_only_itself():
    fake = FakePipeline()
    server = UnCLIPServer.func_or_class.for_pipeline(fake, "fake")
    jobs = [GenerationJob("ok 1"), GenerationJob("boom"), GenerationJob("ok 2"),
            GenerationJob("seeded", {"seed": 3, "num_images": 2})]
    results = server._generate_batch(jobs)
    assert fake.calls[0] == ["ok 1", "boom", "ok 2"]  # shared, failed, then one by one
    assert sorted(map(tuple, fake.calls[1:])) == [("boom",), ("ok 1",), ("ok 2",), ("seeded",)]
    assert [len(results[i][0]) for i in (0, 2)] == [1, 1]
    assert len(results[3][0]) == 2 and results[3][1] == 1
    assert str(results[1]) == ("generation failed on the server (its log has the details); "
                               "retry, or report it if it persists")
    assert "internal detail" not in str(results[1])

    gone = GenerationJob("nobody waits", deadline=time.monotonic() - 1)
    fake.calls.clear()
    result = server._generate_batch([gone])[0]
    assert str(result) == "expired before it started" and fake.calls == []


def test_services_bind_to_loopback_by_default(server):
    """The Serve proxy listens on 127.0.0.1 only, and every entry point defaults to it."""
    import inspect

    from mlflow.cli import server as mlflow_server
    from mlflow.models.cli import serve as mlflow_models_serve

    from orchestration import cli
    from orchestration.serve import models_cli, serving, web_app

    port = urlparse(server).port
    listening = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening == {"127.0.0.1"}
    for function in (serving.run_server, web_app.run_web_app, web_app.build_web_app,
                     models_cli.serve, cli.web_app):
        assert inspect.signature(function).parameters["host"].default == "127.0.0.1", function
    for command in (mlflow_server, mlflow_models_serve):  # what the README tells people to run
        assert {p.name: p.default for p in command.params}["host"] == "127.0.0.1"


def test_local_ray_keeps_its_dashboard_on_loopback(monkeypatch):
    import ray

    from orchestration.common import ray_runtime

    calls = []
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # connect sets it otherwise
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_runtime.connect()
    assert calls[0]["address"] == "local" and calls[0]["dashboard_host"] == "127.0.0.1"


def _alive(process: psutil.Process) -> bool:
    try:  # is_running also compares the start time, so a reused pid does not count
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _session(sid: int) -> set[psutil.Process]:
    found = set()
    for process in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):  # gone meanwhile
            if os.getsid(process.pid) == sid:
                found.add(process)
    return found


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:150]}"
    except psutil.Error:
        return f"{process.pid} (gone)"


@pytest.mark.slow
def test_serve_stops_cleanly_on_sigterm(tmp_path):
    """`unclip serve` with its own local Ray, sent SIGTERM (as `kill` or a process manager
    does): it exits 143 within seconds, with no abort (signal 6) nor traceback, and leaves no
    Ray process behind: no GCS, raylet, dashboard or agent outlives it."""
    model, port, log = save_tiny_pipeline(tmp_path / "pipeline"), free_port(), tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestration.cli", "serve", "--model", str(model),
         "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
        cwd=tmp_path, start_new_session=True)  # own session: what it leaves is findable
    ray_processes: set[psutil.Process] = set()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no /health answer after 120 s"
            with contextlib.suppress(requests.RequestException):  # not up, or no replica yet
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            time.sleep(0.25)
        ray_processes = set(psutil.Process(proc.pid).children(recursive=True))
        names = " ".join(map(_describe, ray_processes))
        assert all(name in names for name in ("gcs_server", "raylet", "dashboard.py")), names

        os.kill(proc.pid, signal.SIGTERM)  # the main process only, not its group
        returncode = proc.wait(timeout=60)
        output = log.read_text()
        assert returncode == 128 + signal.SIGTERM, (returncode, output[-3000:])
        for crash in ("Traceback", "Aborted", "core dumped", "SIGTERM received"):
            assert crash not in output, output[-3000:]

        def left() -> list[psutil.Process]:
            return [p for p in ray_processes | _session(proc.pid) if _alive(p)]

        grace = time.monotonic() + 10  # ray.shutdown signals its processes, then returns
        while left() and time.monotonic() < grace:
            time.sleep(0.5)
        assert not left(), "\n".join(map(_describe, left()))
    finally:
        if proc.poll() is None:
            proc.kill()
        for process in ray_processes | _session(proc.pid):
            with contextlib.suppress(psutil.Error):
                process.kill()
        proc.wait(timeout=10)


def test_torch_threads_follow_the_cpus_a_process_holds(ray_session):
    """A replica (any Ray worker) gets one intra-op thread per CPU Ray reserved for it and one
    inter-op thread; a process outside Ray (`unclip generate`) leaves one core to the rest."""
    import ray

    from orchestration.common.threads import available_cpus

    @ray.remote(num_cpus=1)
    def pools():
        import torch

        from orchestration.common.threads import set_torch_threads

        set_torch_threads()
        return torch.get_num_threads(), torch.get_num_interop_threads()

    assert ray.get(pools.remote()) == (1, 1)
    code = ("import torch; from orchestration.common.threads import set_torch_threads; "
            "print(set_torch_threads(), torch.get_num_interop_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=TIMEOUT)
    assert out.stdout.split() == [str(max(1, available_cpus() - 1)), "1"]
