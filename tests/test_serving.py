"""Ray Serve app from the registry, over real HTTP on loopback (tiny model, 2-3 steps)."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pytest
import requests
from PIL import Image
from test_registry import IMAGE_SIZE, LINEAGE, free_port, save_tiny_pipeline

from orchestration.registry import promote, register_pipeline

MODEL = "unclip-serving"
TIMEOUT = 120


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    from orchestration.serving import run_server

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
