"""`unclip app` in a real browser: headless Chromium (Debian's, via Playwright) against the page
on Ray Serve over loopback, a tiny model registered twice (champion v1, candidate v2) in a real
MLflow SQLite registry, 3 sampling steps."""

from __future__ import annotations

import base64
import io
import secrets
import shutil

import mlflow
import numpy as np
import pytest
import requests
from mlflow.tracking import MlflowClient
from PIL import Image
from test_registry import IMAGE_SIZE, LINEAGE, free_port, save_tiny_pipeline

from orchestration.registry.registry import promote, register_pipeline

pytestmark = pytest.mark.slow

MODEL = "unclip-web"
CHAMPION, CANDIDATE = f"models:/{MODEL}@champion", f"models:/{MODEL}@candidate"
TIMEOUT_MS = 120_000  # sampling shares 2 cores with the rest of the suite
TOKEN = secrets.token_hex(16)  # the page and API run with an access token, as off loopback
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("no chromium on PATH: apt-get install chromium (.ci/run installs it)")
    return found


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory):
    """v1 (fd 2.0) champion, v2 (fd 1.5) candidate with a tuned decoder guidance of 3.5."""
    root = tmp_path_factory.mktemp("web-app")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("web-app", artifact_location=str(root / "art"))
    pipeline = save_tiny_pipeline(root / "pipeline")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        for fd in (2.0, 1.5):
            register_pipeline(pipeline, tracking_uri=uri, model_name=MODEL,
                              metrics={"eval/fd_clip": fd}, parent_run_id=run.info.run_id,
                              **LINEAGE)
    promote(MODEL, 1, tracking_uri=uri)
    MlflowClient(uri, registry_uri=uri).set_model_version_tag(MODEL, "2",
                                                              "best_decoder_guidance", "3.5")
    return uri


@pytest.fixture(scope="module")
def app_url(ray_session, registry_uri, tmp_path_factory):
    from ray import serve

    from orchestration.serve.access import access_for
    from orchestration.serve.web_app import app_models, run_web_app

    models = app_models(None, tracking_uri=registry_uri, registered_model=MODEL)
    assert models == [CHAMPION, CANDIDATE]
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    ready = []
    url = run_web_app(models, tracking_uri=registry_uri, port=free_port(), blocking=False,
                      access=access_for("127.0.0.1", str(token_file)), on_ready=ready.append)
    assert ready == [url]  # announced only once /health answered
    assert url.startswith("http://127.0.0.1:")
    yield url
    serve.shutdown()  # the next module starts its own Serve on the shared Ray


@pytest.fixture(scope="module")
def page(chromium, app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        log_in(page, app_url, TOKEN)
        yield page
        browser.close()


def log_in(page, url: str, token: str) -> None:
    page.goto(url)
    page.get_by_label("username").fill("anyone")
    page.get_by_label("password").fill(token)
    page.get_by_role("button", name="Login").click()


def test_page_and_api_need_the_access_token(chromium, app_url):
    from playwright.sync_api import expect, sync_playwright

    body = {"prompt": "a red circle", "steps": 2}
    for headers in ({}, {"Authorization": "Bearer " + "0" * 32}, {"Authorization": TOKEN}):
        for method, path in [("get", "/health"), ("post", "/"), ("post", "/generate")]:
            answer = requests.request(method, app_url + path, json=body, headers=headers,
                                      timeout=60)
            assert answer.status_code == 401, (headers, path, answer.status_code)
            assert "access token" in answer.json()["error"]
            assert TOKEN not in answer.text
    assert requests.get(f"{app_url}/health", headers=AUTH, timeout=60).status_code == 200
    assert requests.get(f"{app_url}/config", timeout=60).status_code == 401  # the page's state
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        log_in(page, app_url, "0" * 32)  # a wrong token stays at the login form
        expect(page.get_by_role("button", name="Login")).to_be_visible()
        expect(page.locator("#captions")).to_have_count(0)
        browser.close()


def test_page_shows_both_models_with_metrics_lineage_and_tuned_guidance(page):
    from playwright.sync_api import expect

    card_a, card_b = page.locator("#card-A"), page.locator("#card-B")
    expect(card_a).to_contain_text("unclip-web v1 · @champion")
    expect(card_b).to_contain_text("unclip-web v2 · @candidate")
    expect(card_a).to_contain_text(
        "Defaults: decoder guidance 2, ddim sampler, 3 steps (at most 20), 16x16 px")
    expect(card_b).to_contain_text("Defaults: decoder guidance 3.5 (tuned), ddim sampler")
    # headline metrics with readable names first; every raw key folded away below them
    expect(card_a.locator("table").first).to_contain_text(
        "Fréchet distance, CLIP space (lower is better)")
    expect(card_a.locator("td").nth(1)).to_have_text("2")
    expect(card_b.locator("td").nth(1)).to_have_text("1.5")
    expect(card_a.locator("details table")).to_be_hidden()
    expect(card_a.locator("details table")).to_contain_text("eval/fd_clip")
    # the captions and results come before the cards
    boxes = [page.locator(s).bounding_box()["y"] for s in ("#captions", "#strip-A", "#card-A")]
    assert boxes == sorted(boxes)
    expect(card_a).to_contain_text("Dataset s3://bucket/shapes (manifest sha256:abc123)")
    expect(card_a).to_contain_text("Component runs: clip run-clip, prior run-prior, "
                                   "decoder run-dec")


def test_captions_make_one_strip_row_per_model(page, tmp_path):
    from playwright.sync_api import expect

    page.locator("#captions textarea").fill("a red circle\na blue square")
    page.locator("#num-images input").fill("2")
    page.get_by_role("button", name="Generate strip").click()
    for slot in "AB":
        images = page.locator(f"#strip-{slot} img")
        expect(images).to_have_count(4, timeout=TIMEOUT_MS)  # 2 captions x 2 images
        page.wait_for_function("s => [...document.querySelectorAll(s)].every(i => i.complete"
                               " && i.naturalWidth > 0)", arg=f"#strip-{slot} img")
        sizes = images.evaluate_all("els => els.map(e => [e.naturalWidth, e.naturalHeight])")
        assert sizes == [[IMAGE_SIZE, IMAGE_SIZE]] * 4
    expect(page.locator("#strip-A")).to_contain_text("a blue square (2/2)")
    expect(page.locator("#strip-B")).to_contain_text("unclip-web@candidate (v2)")
    red, _, blue, _ = strip_pixels(page, "A")
    assert red.std() > 5 and blue.std() > 5  # drawn, not blank
    assert np.abs(red.astype(int) - blue.astype(int)).mean() > 1  # another caption, another image
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert Image.open(shot).format == "PNG"


def strip_pixels(page, slot: str) -> list[np.ndarray]:
    """The strip's images as the browser received them (its session cookie included)."""
    sources = page.locator(f"#strip-{slot} img").evaluate_all("els => els.map(e => e.src)")
    return [np.array(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
            for src in sources]


def test_the_page_draws_what_the_api_returns_for_the_same_caption_and_seed(page, app_url):
    from playwright.sync_api import expect

    page.locator("#captions textarea").fill("a green triangle")
    page.locator("#num-images input").fill("1")
    page.locator("#seed input").fill("7")
    page.locator("#steps").get_by_role("textbox").fill("")
    page.get_by_role("button", name="Generate strip").click()
    expect(page.locator("#strip-A img")).to_have_count(1, timeout=TIMEOUT_MS)
    expect(page.locator("#strip-A")).to_contain_text("a green triangle")
    (shown,) = strip_pixels(page, "A")
    answer = requests.post(app_url, json={"prompt": "a green triangle", "seed": 7}, headers=AUTH,
                           timeout=120)
    assert answer.status_code == 200, answer.text
    (returned,) = [np.array(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))
                   for text in answer.json()["images"]]
    assert shown.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and shown.std() > 5
    np.testing.assert_array_equal(shown, returned)  # model A is the API's model: same pixels
    page.locator("#seed input").fill("0")


def test_only_models_that_generate_are_offered(registry_uri):
    """A reference evaluator (a CLIP alone) registered beside the pipelines is not listed."""
    from orchestration.serve.web_app import model_choices

    client = MlflowClient(registry_uri, registry_uri=registry_uri)
    client.create_registered_model("unclip-web-evaluator")
    client.create_model_version("unclip-web-evaluator", "runs:/0123/evaluator",
                                tags={"dataset.manifest_hash": "abc"})
    client.set_registered_model_alias("unclip-web-evaluator", "current", "1")
    offered = [uri for _, uri in model_choices(registry_uri, [])]
    assert offered == [CANDIDATE, CHAMPION, f"models:/{MODEL}/2", f"models:/{MODEL}/1"]


@pytest.mark.parametrize(("captions", "num_images", "steps", "message"), [
    ("  \n", "1", "", "prompt: must be a non-empty string"),
    ("a red circle", "9", "", "num_images: must be between 1 and 8 (got 9)"),
    ("a red circle", "1", "21", "steps: at most 20 for unclip-web@champion (v1), whose "
                                "decoder has 20 timesteps (got 21)"),
])
def test_bad_input_is_one_message_naming_the_field(page, captions, num_images, steps, message):
    from playwright.sync_api import expect

    page.locator("#captions textarea").fill(captions)
    page.locator("#num-images input").fill(num_images)
    page.locator("#steps").get_by_role("textbox").fill(steps)
    page.get_by_role("button", name="Generate strip").click()
    expect(page.get_by_text(message, exact=True)).to_be_visible()
    assert "Traceback" not in page.content()
    page.get_by_test_id("toast-close").click()  # the next case starts without a toast
    expect(page.get_by_test_id("toast-body")).to_have_count(0)


def test_uploaded_image_gets_variations_through_serve(page, tmp_path):
    from playwright.sync_api import expect

    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((24, 32, 3), (200, 40, 40), dtype=np.uint8)).save(photo)
    page.locator("#num-images input").fill("2")
    page.locator("#steps").get_by_role("textbox").fill("")
    page.get_by_role("tab", name="Variations").click()
    page.locator("#variations-image input[type=file]").set_input_files(str(photo))
    page.get_by_role("button", name="Make variations").click()
    for slot in "AB":
        expect(page.locator(f"#strip-{slot}")).to_contain_text("variation 2")
        expect(page.locator(f"#strip-{slot} img")).to_have_count(3)  # the input + 2


def test_json_api_answers_beside_the_page(app_url):
    health = requests.get(f"{app_url}/health", headers=AUTH, timeout=60).json()
    assert health["status"] == "ok" and health["model"] == CHAMPION
    body = {"prompt": "a red circle", "num_images": 2, "seed": 5, "steps": 2}
    response = requests.post(app_url, json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    images = [Image.open(io.BytesIO(base64.b64decode(text)))
              for text in response.json()["images"]]
    assert [image.size for image in images] == [(IMAGE_SIZE, IMAGE_SIZE)] * 2
    again = requests.post(f"{app_url}/generate", json=body, headers=AUTH, timeout=120)
    assert again.status_code == 200, (again.status_code, again.text[:300])
    assert again.json()["images"] == response.json()["images"]
    bad = requests.post(app_url, json={"prompt": "a", "num_images": 9}, headers=AUTH,
                        timeout=60)
    assert bad.status_code == 422
    assert bad.json()["error"] == "num_images: must be between 1 and 8 (got 9)"
    wrong_method = requests.get(f"{app_url}/generate", headers=AUTH, timeout=60)
    assert (wrong_method.status_code, wrong_method.json()) == (
        405, {"error": "POST a JSON body with a 'prompt'"})
    page = requests.get(app_url, timeout=60)  # GET / is the page, POST / the API
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_variations_interpolation_and_text_diff(tmp_path):
    """The other three tabs' actions on a local tiny pipeline (no browser: same handlers)."""
    import gradio as gr

    from orchestration.serve.web_app import ModelCache, Page, page_errors

    pipeline = str(save_tiny_pipeline(tmp_path / "pipeline"))
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
                    ).save(photo)
    page = Page(ModelCache(f"sqlite:///{tmp_path}/mlflow.db"), [pipeline])
    sampling = (2, 0, "", "", "")  # num_images, seed, sampler, steps, guidance

    def captions(strip) -> list[str]:
        return [item["caption"] for item in strip.value]

    varied, empty = page._on_variations(pipeline, "", *sampling, str(photo))
    assert captions(varied) == ["input", "variation 1", "variation 2"]
    assert empty.value == [] and empty.label == "B: no model"
    frames, _ = page._on_interpolation(pipeline, "", *sampling, "red", "blue", 4)
    assert captions(frames) == ["red", "0.33", "0.67", "blue"]
    edits, _ = page._on_text_diff(pipeline, "", *sampling, str(photo), "noise", "a circle", 3)
    assert captions(edits) == ["input", "ratio 0.00", "ratio 0.25", "ratio 0.50"]
    (tmp_path / "not.png").write_bytes(b"not an image")
    for handler, args, message in [
        (page._on_variations, (str(tmp_path / "not.png"),), "image: not an image"),
        (page._on_variations, (None,), "image: upload an image first"),
        (page._on_interpolation, ("red", "blue", 9), "frames: must be a whole number between "
                                                     "2 and 8 (got 9)"),
        (page._on_text_diff, (str(photo), "", "b", 3), "Its caption: must be a non-empty "
                                                       "string")]:
        with pytest.raises(gr.Error) as raised:
            page_errors(handler)(pipeline, "", *sampling, *args)
        assert raised.value.message == message


def test_page_and_api_under_load_answer_images_or_busy_and_nothing_else(app_url):
    """Twice what the app serves, API and page at once (benchmarks/load_test.py for 20 s; its
    5-minute run on the release is in docs/reliability.md), then more page actions at one
    moment than its queue holds (32 against 16): every answer is an image or a busy answer,
    the server still answers."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from load_test import run_burst, run_load, service_time

    seconds = service_time(app_url, TOKEN, 3)
    steady = run_load(app_url, TOKEN, (CHAMPION, CANDIDATE), duration_s=20,
                      rate_per_s=2 / seconds)
    assert steady["errors"] == 0, steady["first_errors"]
    assert steady["api_image"] > 0 and steady["page_image"] > 0, steady
    burst = run_burst(app_url, TOKEN, (CHAMPION, CANDIDATE), 32)
    assert burst["errors"] == 0, burst["first_errors"]
    assert burst["page_busy"] >= 1 and burst["page_image"] >= 1, burst  # the queue is bounded
    assert requests.get(f"{app_url}/health", headers=AUTH, timeout=60).status_code == 200
