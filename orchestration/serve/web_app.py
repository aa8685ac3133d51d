"""`unclip app`: a Gradio page to try registered models, beside the JSON API, on Ray Serve.

One Serve application with one deployment and one replica (Gradio keeps its queue and upload
state in process). Its FastAPI app answers the JSON API of `unclip serve` - the same
`UnCLIPServer` code, on the first model - at POST / and /generate and GET /health, and mounts
the page at / (GET / is the page, POST / the API).

The page puts two model pickers side by side (champion and candidate by default), each with
the version's metrics and lineage from its registry tags, and draws every result as a strip:
one gallery row per model, so the same caption and seed line up across models (the comic-strip
gallery of Sanchez Bermudez 2022, sec. 4.4). Besides captions -> images it does the
variations, interpolations and text diffs of Ramesh et al. 2022, sec. 3. Input is checked with
the limits of `orchestration.registry.pyfunc_model`, so the page, the API and the CLI refuse
the same things with the same message.
"""

from __future__ import annotations

import functools
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from fastapi import FastAPI
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import serve

from data_pipelines.images import BadImage, decode_image
from data_pipelines.settings import PreprocessSettings
from data_pipelines.streaming import preprocess_image
from models.unclip_pipeline import UnCLIPPipeline
from orchestration.common.ray_runtime import connect
from orchestration.registry import registry
from orchestration.registry.pyfunc_model import (
    MAX_PROMPTS,
    InvalidRequest,
    check_options,
    check_prompt,
    generate_kwargs,
)
from orchestration.registry.registry import RegistryError
from orchestration.serve.access import TOKEN_USER_HINT, Access, access_for, token_matches
from orchestration.serve.serving import (
    UnCLIPServer,
    announce_when_answering,
    serve_until_stopped,
)
from orchestration.stages import stage_names

APP_NAME = "unclip-app"
MAX_MODELS_LOADED = 4  # pipelines kept in the replica; the least recently used goes first
MAX_STRIP_COLUMNS = 8
FRAMES_RANGE = (2, 8)
TEXT_DIFF_MAX_RATIO = 0.5  # Ramesh et al. 2022, fig. 5 go up to 0.5
MAX_UPLOAD = "10mb"
# actions waiting for the one sampler; past that Gradio's page says "This application is
# currently busy. Please try again." instead of queueing without end
PAGE_QUEUE_SIZE = 16
# (metric key, what a person reads): the card's headline rows, in this order, where present
HEADLINE_METRICS = (
    ("attr_colour_shape", "Colour and shape right"),
    ("attr_colour", "Colour right"),
    ("attr_shape", "Shape right"),
    ("r_precision", "R-precision (its caption ranked first)"),
    ("clip_score", "CLIP score"),
    ("fd_clip", "Fréchet distance, CLIP space (lower is better)"),
)
NO_MODEL = ""  # picker value: leave slot B empty
# Path -> methods. POST / is the API and GET / falls through to the page; on the other two
# UnCLIPServer answers every method itself (405 with its reason), as under `unclip serve`.
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
JSON_ROUTES = {"/": ["POST"], "/generate": ALL_METHODS, "/health": ALL_METHODS}
# Small samples scaled up stay sharp; a one-row strip drops the gallery's 320px minimum.
CSS = """
.strip img { image-rendering: pixelated; }
.strip .grid-wrap { min-height: 0 !important; height: auto !important; }
.card table { font-size: 0.85em; }
"""


# ----- the registry side: what can be picked, and what a version says about itself ---------------
def _client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def model_choices(tracking_uri: str, extra: list[str]) -> list[tuple[str, str]]:
    """(label, URI) for the URIs given on the command line, then every registered model's
    aliases and versions (newest first)."""
    client = _client(tracking_uri)
    choices = []
    for found in client.search_registered_models(max_results=100):
        name = found.name
        versions = sorted((int(mv.version) for mv in
                           client.search_model_versions(f"name = '{name}'")
                           if can_generate(mv)), reverse=True)
        aliases = client.get_registered_model(name).aliases or {}
        choices += [(f"{name} @{alias} (v{version})", f"models:/{name}@{alias}")
                    for alias, version in sorted(aliases.items()) if int(version) in versions]
        choices += [(f"{name} v{version}", f"models:/{name}/{version}") for version in versions]
    listed = {uri for _, uri in choices}
    return [(uri, uri) for uri in extra if uri not in listed] + choices


def can_generate(model_version) -> bool:
    """Whether a registered version is a text-to-image pipeline: `register_pipeline` records
    the run it came from; a reference evaluator (a CLIP alone) has no such tag."""
    return registry.SOURCE_RUN_TAG in (model_version.tags or {})


def registry_version(tracking_uri: str, uri: str):
    """The MLflow ModelVersion behind models:/NAME@alias or models:/NAME/VERSION, else None."""
    client = _client(tracking_uri)
    found = registry.model_version(client, uri)  # RegistryError for an unknown alias
    if found is None:
        return None
    try:
        return client.get_model_version(*found)
    except MlflowException:
        raise RegistryError(f"{uri}: model {found[0]!r} has no version {found[1]}") from None


def app_models(uris: list[str] | None, *, tracking_uri: str, registered_model: str) -> list[str]:
    """The models the app starts with, checked before anything is deployed. Default: the
    config's registered model @champion and @candidate (those that exist)."""
    if not uris:
        client = _client(tracking_uri)
        try:
            aliases = client.get_registered_model(registered_model).aliases or {}
        except MlflowException:
            aliases = {}
        uris = [f"models:/{registered_model}@{alias}" for alias in
                (registry.CHAMPION, registry.CANDIDATE) if alias in aliases]
        if not uris:
            raise RegistryError(f"no {registered_model}@champion or @candidate in "
                                f"{tracking_uri}; run `unclip pipeline` or pass --model")
    return [_checked_uri(uri, tracking_uri) for uri in uris]


def _checked_uri(uri: str, tracking_uri: str) -> str:
    if uri.startswith("models:"):
        if not registry.MODEL_URI_RE.match(uri):
            raise RegistryError(f"{uri}: use models:/NAME@alias or models:/NAME/VERSION")
        registry_version(tracking_uri, uri)
        return uri
    if "://" in uri or uri.startswith("runs:"):
        return uri  # checked when the replica downloads it
    # A relative path would resolve against the replica's working directory.
    local = Path(uri).expanduser().absolute()
    if not local.is_dir() or registry.pipeline_dir_in(local) is None:
        raise RegistryError(f"{uri}: not a saved pipeline or MLflow model directory")
    return str(local)


def _metrics_table(version) -> list[str]:
    """A few headline metrics with readable names and their 95% intervals; every metric in a
    folded table below them."""
    metrics = registry.version_metrics(version)
    if not metrics:
        return ["No evaluation metrics on this version."]
    headline = [_headline_row(label, metrics, key) for key, label in HEADLINE_METRICS]
    full = ["<details><summary>All metrics</summary>\n", "| metric | value |", "|---|---|",
            *(f"| {name} | {value:.4g} |" for name, value in sorted(metrics.items())),
            "\n</details>"]
    return ["| headline | value [95% interval] |", "|---|---|",
            *(row for row in headline if row), "", *full]


def _headline_row(label: str, metrics: dict, key: str) -> str | None:
    found = next((k for k in (f"eval/{key}", key) if k in metrics), None)
    if found is None:
        return None
    low, high = metrics.get(f"{found}_lo"), metrics.get(f"{found}_hi")
    interval = f" [{low:.3g}, {high:.3g}]" if low is not None and high is not None else ""
    return f"| {label} | **{metrics[found]:.3g}**{interval} |"


def _lineage(tags: dict) -> list[str]:
    runs = ", ".join(f"{stage} `{tags[registry.COMPONENT_RUN_TAG.format(stage)]}`"
                     for stage in stage_names()
                     if registry.COMPONENT_RUN_TAG.format(stage) in tags)
    lines = [f"Dataset `{tags.get(registry.DATASET_URI_TAG, '?')}` "
             f"(manifest `{tags.get(registry.MANIFEST_HASH_TAG, '?')}`)"]
    if runs:
        lines.append(f"Component runs: {runs}")
    if registry.SOURCE_RUN_TAG in tags:
        lines.append(f"Registered from run `{tags[registry.SOURCE_RUN_TAG]}`")
    if registry.PROMOTION_TAG in tags:
        lines.append(f"Promotion: {tags[registry.PROMOTION_TAG]}")
    return lines


def model_card(uri: str, pipeline: UnCLIPPipeline, version=None) -> str:
    """Markdown: the version's aliases, metrics and lineage tags, then the sampling defaults
    the page uses for it (its tuned guidance when `unclip tune guidance` set one)."""
    s, decoder = pipeline.sampling, pipeline.decoder.decoder_config
    tuned = "best_decoder_guidance" in (version.tags if version else {})
    sampling = (f"Defaults: decoder guidance **{s.decoder_guidance:g}**"
                f"{' (tuned)' if tuned else ''}, {s.sampler} sampler, {s.steps or 'all'} steps "
                f"(at most {decoder.num_timesteps}), {decoder.image_size}x{decoder.image_size} px")
    if version is None:
        return "\n\n".join([f"**{uri}** (not in the registry)", sampling])
    aliases = ", ".join(f"@{a}" for a in sorted(version.aliases or [])) or "no alias"
    header = f"**{version.name} v{version.version}** · {aliases}"
    return "\n\n".join([header, sampling, "\n".join(_metrics_table(version)),
                        *_lineage(version.tags)])


# ----- models in the replica ------------------------------------------------------------------
@dataclass
class LoadedModel:
    uri: str
    label: str
    pipeline: UnCLIPPipeline
    card: str

    @property
    def max_steps(self) -> int:
        return self.pipeline.decoder.decoder_config.num_timesteps


class ModelCache:
    """Pipelines by URI, loaded on first use; past `capacity` the least recently used goes."""

    def __init__(self, tracking_uri: str, capacity: int = MAX_MODELS_LOADED):
        self.tracking_uri, self.capacity = tracking_uri, capacity
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # Gradio runs handlers in threads: load each model once

    def get(self, uri: str, pipeline: UnCLIPPipeline | None = None) -> LoadedModel:
        with self._lock:
            if uri not in self._models:
                self._models[uri] = self._describe(uri, pipeline or self._load(uri))
            self._models.move_to_end(uri)
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return self._models[uri]

    def _load(self, uri: str) -> UnCLIPPipeline:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with tempfile.TemporaryDirectory(prefix="unclip-app-") as download:
            directory = registry.resolve_model_uri(uri, tracking_uri=self.tracking_uri,
                                                   dst_dir=download)
            return UnCLIPPipeline.load(directory, map_location=device)

    def _describe(self, uri: str, pipeline: UnCLIPPipeline) -> LoadedModel:
        version = registry_version(self.tracking_uri, uri)
        label = f"{version.name} v{version.version}" if version else Path(uri).name
        if version and "@" in uri:
            label = f"{uri.split('/', 1)[1]} (v{version.version})"
        return LoadedModel(uri, label, pipeline, model_card(uri, pipeline, version))


# ----- what the page does with one model -------------------------------------------------------
Panels = list[tuple[np.ndarray, str]]


def check_captions(text: str | None) -> list[str]:
    """One caption per non-empty line, each checked like an API prompt."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        check_prompt("")  # raises: prompt: must be a non-empty string
    if len(lines) > MAX_PROMPTS:
        raise InvalidRequest("prompt", f"at most {MAX_PROMPTS} captions (got {len(lines)})")
    return [check_prompt(line, field=f"prompt (line {i})") for i, line in enumerate(lines, 1)]


def typed(text: str | None):
    """A number typed in a text box; blank means the model's default (None). Anything else
    goes on as typed, for check_options to refuse with the field's name and limit."""
    text = (text or "").strip()
    if not text:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def check_frames(value) -> int:
    low, high = FRAMES_RANGE
    if value is None or float(value) != int(value) or not low <= value <= high:
        raise InvalidRequest("frames", f"must be a whole number between {low} and {high} "
                                       f"(got {value})")
    return int(value)


def check_steps(options: dict, model: LoadedModel) -> None:
    steps = options.get("steps")
    if steps is not None and steps > model.max_steps:
        raise InvalidRequest("steps", f"at most {model.max_steps} for {model.label}, whose "
                                      f"decoder has {model.max_steps} timesteps (got {steps})")


def read_image(path: str | None):
    """An uploaded file -> RGB PIL image (odd modes normalised as on ingest)."""
    if not path:
        raise InvalidRequest("image", "upload an image first")
    try:
        return decode_image(Path(path).read_bytes())
    except BadImage as exc:  # a short reason: not an image, truncated, too many pixels
        raise InvalidRequest("image", str(exc)) from None


def image_tensor(image, size: int) -> torch.Tensor:
    """[1, 3, size, size] in [-1, 1], centre-cropped and resized as in training."""
    array = preprocess_image(image, PreprocessSettings(image_size=size), rng=None, train=False)
    return torch.from_numpy(array)[None]


def decoder_input(pipeline: UnCLIPPipeline, image) -> torch.Tensor:
    return image_tensor(image, pipeline.decoder.decoder_config.image_size)


def _uint8(images: torch.Tensor) -> list[np.ndarray]:
    return [image.numpy() for image in images]


def _sampling(options: dict) -> dict:
    """The options variations, interpolations and text diffs take (they always use DDIM)."""
    return {key: options[key] for key in ("seed", "steps", "decoder_guidance") if key in options}


def strip(model: LoadedModel, prompts: list[str], options: dict) -> Panels:
    per_prompt = options.get("num_images", 1)
    images = model.pipeline.generate(prompts, **generate_kwargs(options))
    captions = [prompt if per_prompt == 1 else f"{prompt} ({k + 1}/{per_prompt})"
                for prompt in prompts for k in range(per_prompt)]
    return list(zip(_uint8(images), captions, strict=True))


@torch.no_grad()
def image_embedding(pipeline: UnCLIPPipeline, image) -> torch.Tensor:
    """The CLIP image embedding, at CLIP's own input size (it may differ from the decoder's)."""
    size = getattr(pipeline.clip.visual, "image_size", None)
    size = size[0] if isinstance(size, tuple | list) else size
    tensor = image_tensor(image, size or pipeline.decoder.decoder_config.image_size)
    return pipeline.clip.encode_image(tensor.to(pipeline.device)).float()[0]


@torch.no_grad()
def _prior_embeddings(pipeline: UnCLIPPipeline, prompts: list[str], seed: int) -> torch.Tensor:
    """CLIP image embeddings the prior draws for `prompts`, with the model's prior settings
    (the first half of `UnCLIPPipeline.generate`, which has no public step for it)."""
    text_emb, tokens = pipeline.encode_text(prompts)
    s = pipeline.sampling
    return pipeline.prior.sample(text_emb=text_emb, text_tokens=tokens,
                                 guidance_scale=s.prior_guidance, num_candidates=s.num_candidates,
                                 sampler=s.prior_sampler, steps=s.prior_steps,
                                 generator=torch.Generator().manual_seed(seed))


def _input_panel(image: torch.Tensor) -> tuple[np.ndarray, str]:
    pixels = ((image[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    return pixels.numpy(), "input"


def variations(model: LoadedModel, path: str | None, options: dict) -> Panels:
    pipeline, image = model.pipeline, read_image(path)
    count = options.get("num_images", 1)
    images = pipeline.variations(image_embedding(pipeline, image), num_variations=count,
                                 **_sampling(options))
    labels = [f"variation {k + 1}" for k in range(count)]
    return [_input_panel(decoder_input(pipeline, image)),
            *zip(_uint8(images), labels, strict=True)]


def interpolation(model: LoadedModel, prompts: tuple[str, str], frames: int,
                  options: dict) -> Panels:
    pipeline = model.pipeline
    emb_a, emb_b = _prior_embeddings(pipeline, list(prompts), options.get("seed", 0))
    images = pipeline.interpolate(emb_a, emb_b, num=frames, **_sampling(options))
    labels = [f"{t:.2f}" for t in np.linspace(0, 1, frames)]
    labels[0], labels[-1] = prompts
    return list(zip(_uint8(images), labels, strict=True))


def text_diff(model: LoadedModel, path: str | None, captions: tuple[str, str], frames: int,
              options: dict) -> Panels:
    pipeline, image = model.pipeline, read_image(path)
    start = decoder_input(pipeline, image)  # DDIM-inverted: the edits keep its layout
    ratios = tuple(float(r) for r in np.linspace(0, TEXT_DIFF_MAX_RATIO, frames))
    images = pipeline.text_diff(image_embedding(pipeline, image), *captions, ratios=ratios,
                                images=start, **_sampling(options))
    return [_input_panel(start), *zip(_uint8(images), [f"ratio {r:.2f}" for r in ratios],
                                      strict=True)]


# ----- the page -----------------------------------------------------------------------------------
def page_errors(handler: Callable) -> Callable:
    """Input a user can fix becomes one in-page message naming the field; never a trace."""

    @functools.wraps(handler)
    def wrapper(*args):
        try:
            return handler(*args)
        except (InvalidRequest, RegistryError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as exc:  # anything else still says what went wrong, in one line
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise gr.Error(f"{type(exc).__name__}: {first}" if first else type(exc).__name__,
                           print_exception=True) from None

    return wrapper


class Page:
    """Builds the Blocks; its handlers run each action on the one or two picked models."""

    def __init__(self, models: ModelCache, model_uris: list[str]):
        self.models, self.model_uris = models, model_uris

    def choices(self) -> list[tuple[str, str]]:
        return model_choices(self.models.tracking_uri, self.model_uris)

    def card(self, uri: str) -> str:
        return self.models.get(uri).card if uri else "No model in this slot."

    def refresh(self, uri_a: str, uri_b: str):
        """On page load: the registry's current versions and both cards."""
        choices = self.choices()
        picker_b = [("(none)", NO_MODEL), *choices]
        return (gr.Dropdown(choices=choices, value=uri_a), gr.Dropdown(choices=picker_b,
                value=uri_b), self.card(uri_a), self.card(uri_b))

    def run(self, uris: tuple[str, str], options: dict, action: Callable) -> tuple:
        """`action(model)` for each picked model -> one strip (gallery row) per slot."""
        if not any(uris):
            raise InvalidRequest("model", "pick at least one model")
        picked = {uri: self.models.get(uri) for uri in uris if uri}
        for model in picked.values():  # every limit before any sampling
            check_steps(options, model)
        strips = []
        for slot, uri in zip("AB", uris, strict=True):
            if not uri:
                strips.append(gr.Gallery(value=None, label=f"{slot}: no model"))
                continue
            start = time.monotonic()
            panels = action(picked[uri])
            strips.append(gr.Gallery(
                value=panels, columns=min(len(panels), MAX_STRIP_COLUMNS),
                label=f"{slot}: {picked[uri].label} · {time.monotonic() - start:.1f}s"))
        return tuple(strips)

    @staticmethod
    def options(num_images, seed, sampler, steps, guidance) -> dict:
        return check_options({"num_images": num_images, "seed": seed, "steps": typed(steps),
                              "sampler": sampler or None, "decoder_guidance": typed(guidance)})

    def build(self) -> gr.Blocks:
        first = self.model_uris[0]
        second = self.model_uris[1] if len(self.model_uris) > 1 else NO_MODEL
        with gr.Blocks(title="unCLIP: try a model", analytics_enabled=False) as page:
            gr.Markdown("# unCLIP: try a model\nPick one or two models (champion and candidate "
                        "side by side), then generate. Each result is a strip: one row per "
                        "model. The JSON API answers at this address too (POST /, GET /health).")
            with gr.Row(equal_height=False):
                pickers = [gr.Dropdown(label=f"Model {slot}", value=uri, choices=[(uri, uri)],
                                       elem_id=f"pick-{slot}")
                           for slot, uri in (("A", first), ("B", second))]
            with gr.Row():
                num_images = gr.Number(1, label="Images per caption (num_images, 1 to 8)",
                                       elem_id="num-images")
                seed = gr.Number(0, label="Seed", elem_id="seed")
                sampler = gr.Dropdown([("model default", ""), "ddim", "ddpm"], value="",
                                      label="Sampler (captions only)")
                # Text, not gr.Number: an empty number box sends 0, and blank must mean default.
                steps = gr.Textbox(label="Steps", placeholder="model default", elem_id="steps")
                guidance = gr.Textbox(label="Decoder guidance", elem_id="guidance",
                                      placeholder="model default (tuned scale if any)")
            # The strips sit below the tabs but exist first, so every button can target them.
            strips = [gr.Gallery(label=slot, columns=MAX_STRIP_COLUMNS, format="png",
                                 object_fit="contain", height="auto", interactive=False,
                                 elem_id=f"strip-{slot}", elem_classes="strip", render=False)
                      for slot in "AB"]
            self._tabs([*pickers, num_images, seed, sampler, steps, guidance], strips)
            for gallery in strips:
                gallery.render()
            # what each model is comes after what it draws: headline metrics, all folded below
            with gr.Row(equal_height=False):
                cards = [gr.Markdown(elem_id=f"card-{slot}", elem_classes="card")
                         for slot in "AB"]
            for picker, card in zip(pickers, cards, strict=True):
                picker.change(page_errors(self.card), picker, card)
            page.load(page_errors(self.refresh), pickers, [*pickers, *cards])
        return page

    def _tabs(self, shared: list, strips: list) -> None:
        def button(text: str, handler: Callable, inputs: list) -> None:
            gr.Button(text, variant="primary").click(page_errors(handler), [*shared, *inputs],
                                                     strips)

        with gr.Tabs():
            with gr.Tab("Captions"):
                captions = gr.Textbox(label="Captions (one per line)", lines=3,
                                      elem_id="captions", placeholder="a red circle")
                button("Generate strip", self._on_strip, [captions])
            with gr.Tab("Variations"):
                upload = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"],
                                  elem_id="variations-image")
                button("Make variations", self._on_variations, [upload])
            with gr.Tab("Interpolation"):
                with gr.Row():
                    start, end = gr.Textbox(label="Prompt A"), gr.Textbox(label="Prompt B")
                frames = gr.Number(5, label="Frames (2 to 8)")
                button("Interpolate", self._on_interpolation, [start, end, frames])
            with gr.Tab("Text diff"):
                source = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"])
                with gr.Row():
                    said, wanted = (gr.Textbox(label="Its caption"),
                                    gr.Textbox(label="New caption"))
                diff_frames = gr.Number(3, label="Frames (2 to 8, ratio 0 to 0.5)")
                button("Move towards the new caption", self._on_text_diff,
                       [source, said, wanted, diff_frames])

    def _on_strip(self, uri_a, uri_b, *sampling_and_captions):
        *sampling, text = sampling_and_captions
        prompts, options = check_captions(text), self.options(*sampling)
        return self.run((uri_a, uri_b), options, lambda m: strip(m, prompts, options))

    def _on_variations(self, uri_a, uri_b, *sampling_and_image):
        *sampling, path = sampling_and_image
        options = self.options(*sampling)
        return self.run((uri_a, uri_b), options, lambda m: variations(m, path, options))

    def _on_interpolation(self, uri_a, uri_b, *rest):
        *sampling, start, end, frames = rest
        prompts = (check_prompt(start, field="Prompt A"), check_prompt(end, field="Prompt B"))
        options, frames = self.options(*sampling), check_frames(frames)
        return self.run((uri_a, uri_b), options,
                        lambda m: interpolation(m, prompts, frames, options))

    def _on_text_diff(self, uri_a, uri_b, *rest):
        *sampling, path, said, wanted, frames = rest
        captions = (check_prompt(said, field="Its caption"),
                    check_prompt(wanted, field="New caption"))
        options, frames = self.options(*sampling), check_frames(frames)
        return self.run((uri_a, uri_b), options,
                        lambda m: text_diff(m, path, captions, frames, options))


# ----- Serve ----------------------------------------------------------------------------------
@serve.deployment(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class UnCLIPWebApp:
    def __init__(self, model_uris: list[str], tracking_uri: str, host: str,
                 token_digest: str | None = None):
        # The JSON API exactly as `unclip serve` runs it, on the first model; the page shares
        # its pipeline instead of loading a second copy.
        self.api = UnCLIPServer.func_or_class(model_uris[0], tracking_uri,
                                              token_digest=token_digest)
        self.token_digest = token_digest
        self.models = ModelCache(tracking_uri)
        self.models.get(model_uris[0], self.api.pipeline)
        self.model_uris, self.host = model_uris, host

    def __serve_build_asgi_app__(self):
        # Called in the replica after __init__: Gradio's state never crosses processes.
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        for path, methods in JSON_ROUTES.items():
            app.add_route(path, self.api.__call__, methods=methods)
        page = Page(self.models, self.model_uris).build()
        # sampling is CPU/GPU-bound: one at a time, and a bounded line of waiting actions
        page.queue(default_concurrency_limit=1, max_size=PAGE_QUEUE_SIZE)
        return gr.mount_gradio_app(app, page, path="/", server_name=self.host, css=CSS,
                                   auth=self._login if self.token_digest else None,
                                   auth_message=f"Access token: {TOKEN_USER_HINT}.",
                                   show_error=False, footer_links=[], run_history=False,
                                   max_file_size=MAX_UPLOAD, ssr_mode=False, mcp_server=False)


    def _login(self, _user: str, password: str) -> bool:
        return token_matches(self.token_digest, password)


def build_web_app(model_uris: list[str], *, tracking_uri: str, host: str = "127.0.0.1",
                  num_gpus: float = 0.0, token_digest: str | None = None):
    return UnCLIPWebApp.options(ray_actor_options={"num_cpus": 1, "num_gpus": num_gpus}
                                ).bind(model_uris, tracking_uri, host, token_digest)


def run_web_app(model_uris: list[str], *, tracking_uri: str, host: str = "127.0.0.1",
                port: int = 8000, num_gpus: float = 0.0, blocking: bool = True,
                access: Access | None = None, on_ready=None) -> str:
    """Deploy the page + API on host:port (loopback by default; a wider bind needs a token or
    an explicit insecure `access`); returns the base URL. `on_ready(url)` is called once
    /health answers. With blocking, serves until Ctrl-C and then shuts Serve down."""
    access = access or access_for(host)
    connect()  # no-op when already connected
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_web_app(model_uris, tracking_uri=tracking_uri, host=host,
                            num_gpus=num_gpus, token_digest=access.token_digest),
              name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    announce_when_answering(url, access, on_ready)
    if blocking:
        serve_until_stopped()
    return url
