"""`unclip app` under load: the page and the JSON API at once, at a multiple of what the
machine can serve, every answer classified.

The app runs here on a local Ray (loopback, with an access token, as it would off loopback).
First its capacity is measured: one image at a time through the API, `--calibrate` requests,
median service time S. Then for `--duration` seconds requests arrive at `--load` / S per
second (Poisson arrivals), alternately to the API (POST /generate) and to the page (its
"Generate strip" action through gradio_client, the client Gradio ships). Each answer is an
image, a busy answer (API: 503; page: Gradio's "queue is full", which the browser shows as
"This application is currently busy. Please try again.") or an error; errors must be 0.
Memory (RSS of the app's replica and Serve's HTTP proxy) is read at start and end, and
/health must still answer afterwards.

    python benchmarks/load_test.py --model release/shapes --duration 300 --load 2 \
        --out benchmarks/load_test.json
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PROMPTS = ["a large red circle", "a small blue square", "a green triangle", "a yellow star"]
PAGE_ACTION = "/_on_strip"  # the page's "Generate strip" button (its handler's name)


class Tally:
    """Answers by kind, latencies of the images, and the first few errors verbatim."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {f"{route}_{kind}": 0 for route in ("api", "page")
                       for kind in ("image", "busy", "error")}
        self.latencies = {"api": [], "page": []}
        self.errors: list[str] = []

    def add(self, route: str, kind: str, seconds: float, detail: str = "") -> None:
        with self.lock:
            self.counts[f"{route}_{kind}"] += 1
            if kind == "image":
                self.latencies[route].append(seconds)
            if kind == "error" and len(self.errors) < 5:
                self.errors.append(f"{route}: {detail[:300]}")

    def summary(self) -> dict:
        def pct(values, q):
            return round(statistics.quantiles(values, n=100)[q - 1], 3) if len(values) > 1 \
                else (round(values[0], 3) if values else None)

        latency = {f"{route}_{name}_s": pct(values, q) for route, values in
                   self.latencies.items() for name, q in (("p50", 50), ("p99", 99))}
        return {**self.counts, "requests": sum(self.counts.values()),
                "errors": sum(v for k, v in self.counts.items() if k.endswith("error")),
                **latency, "first_errors": self.errors}


def api_request(url: str, token: str, prompt: str, tally: Tally, timeout: float) -> None:
    import requests

    start = time.monotonic()
    try:
        answer = requests.post(f"{url}/generate", json={"prompt": prompt}, timeout=timeout,
                               headers={"Authorization": f"Bearer {token}"})
    except requests.RequestException as exc:
        tally.add("api", "error", 0.0, repr(exc))
        return
    took = time.monotonic() - start
    if answer.status_code == 200 and answer.json().get("images"):
        tally.add("api", "image", took)
    elif answer.status_code == 503 and "busy" in answer.json().get("error", ""):
        tally.add("api", "busy", took)
    else:
        tally.add("api", "error", took, f"{answer.status_code} {answer.text}")


def page_request(client, models: tuple[str, str], prompt: str, tally: Tally) -> None:
    start = time.monotonic()
    try:
        strips = client.predict(*models, 1, 0, "", "", "", prompt, api_name=PAGE_ACTION)
    except Exception as exc:  # gradio_client raises AppError/ValueError with Gradio's message
        text = str(exc)
        kind = "busy" if "queue is full" in text.lower() else "error"
        tally.add("page", kind, time.monotonic() - start, f"{type(exc).__name__}: {text}")
        return
    images = strips[0].get("value") if isinstance(strips[0], dict) else strips[0]
    tally.add("page", "image" if images else "error", time.monotonic() - start, repr(strips))


def run_load(url: str, token: str, models: tuple[str, str], *, duration_s: float,
             rate_per_s: float, seed: int = 0, timeout: float = 120.0) -> dict:
    """Poisson arrivals at `rate_per_s` for `duration_s`, alternately API and page (its two
    pickers set to `models`, as the page starts: B is "" when it shows one model); waits
    for every answer. Returns the tally's summary."""
    from gradio_client import Client

    tally, rng = Tally(), random.Random(seed)
    clients = threading.local()

    def page(prompt):
        if not hasattr(clients, "client"):
            clients.client = Client(url + "/", auth=("load", token), verbose=False)
        page_request(clients.client, models, prompt, tally)

    with ThreadPoolExecutor(max_workers=64) as pool:
        deadline, sent = time.monotonic() + duration_s, 0
        while time.monotonic() < deadline:
            prompt = PROMPTS[sent % len(PROMPTS)]
            if sent % 2 == 0:
                pool.submit(api_request, url, token, prompt, tally, timeout)
            else:
                pool.submit(page, prompt)
            sent += 1
            time.sleep(rng.expovariate(rate_per_s))
    return tally.summary()


def run_burst(url: str, token: str, models: tuple[str, str], count: int) -> dict:
    """`count` page actions at the same moment: more than the page's queue holds."""
    from gradio_client import Client

    tally, barrier = Tally(), threading.Barrier(count)
    clients = [Client(url + "/", auth=("load", token), verbose=False) for _ in range(count)]

    def one(i):
        barrier.wait()  # every client logged in first: the actions arrive together
        page_request(clients[i], models, PROMPTS[i % len(PROMPTS)], tally)

    with ThreadPoolExecutor(max_workers=count) as pool:
        list(pool.map(one, range(count)))
    return tally.summary()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_time(url: str, token: str, count: int) -> float:
    """Median seconds of one single-image API request with nothing else running."""
    import requests

    times = []
    for i in range(count):
        start = time.monotonic()
        answer = requests.post(f"{url}/generate", json={"prompt": PROMPTS[i % len(PROMPTS)]},
                               headers={"Authorization": f"Bearer {token}"}, timeout=300)
        answer.raise_for_status()
        times.append(time.monotonic() - start)
    return statistics.median(times)


def serve_rss_mb() -> dict:
    """Resident memory of the app's replica and Serve's proxy (MB)."""
    import psutil
    import ray
    from ray.util.state import list_actors

    found = {}
    for actor in list_actors(address=ray.get_runtime_context().gcs_address,
                             filters=[("state", "=", "ALIVE")], limit=1000):
        if "UnCLIPWebApp" in actor.class_name or actor.class_name == "ProxyActor":
            name = "proxy" if actor.class_name == "ProxyActor" else "replica"
            found[name] = round(psutil.Process(actor.pid).memory_info().rss / 2**20, 1)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="release/shapes")
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--load", type=float, default=2.0, help="multiple of the capacity")
    parser.add_argument("--calibrate", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import requests
    from ray import serve

    from orchestration.serve.access import access_for
    from orchestration.serve.web_app import run_web_app
    token = secrets.token_hex(16)
    from orchestration.common.ray_runtime import init_local

    init_local(log_to_driver=False)  # as `unclip app` starts Ray
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        token_file.write_text(token)
        model = str(Path(args.model).absolute())
        url = run_web_app([model], tracking_uri=f"sqlite:///{tmp}/mlflow.db", port=_free_port(),
                          blocking=False, access=access_for("127.0.0.1", str(token_file)))
        service_time(url, token, 1)  # warm-up
        seconds = service_time(url, token, args.calibrate)
        memory_start = serve_rss_mb()
        rate = args.load / seconds
        print(f"capacity about {1 / seconds:.2f} images/s; sending {rate:.2f} requests/s "
              f"for {args.duration:g} s", flush=True)
        start = time.monotonic()
        result = run_load(url, token, (model, ""), duration_s=args.duration, rate_per_s=rate)
        health = requests.get(f"{url}/health", timeout=60,
                              headers={"Authorization": f"Bearer {token}"})
        report = {"model": args.model, "duration_s": args.duration, "load": args.load,
                  "service_time_s": round(seconds, 3), "rate_per_s": round(rate, 3),
                  "wall_s": round(time.monotonic() - start, 1), **result,
                  "memory_mb_start": memory_start, "memory_mb_end": serve_rss_mb(),
                  "health_after": health.status_code}
        serve.shutdown()
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
