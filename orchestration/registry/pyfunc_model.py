"""The MLflow pyfunc wrapper of a saved `UnCLIPPipeline`: prompts in, base64 PNGs out.

Logged as "models from code": MLflow copies this file into the model and executes it on load,
next to a copy of the pure-PyTorch `models` package (code_paths). So this file must import
nothing from orchestration/data_pipelines (not even at call time): a serving machine has only
the model directory. The request limits live here for the same reason; serving and the CLI
import them from here so every entry point enforces the same ones.
"""

from __future__ import annotations

import base64
import io
import math

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

PIPELINE_ARTIFACT = "pipeline"
OUTPUT_COLUMNS = ["prompt", "image_index", "png_base64"]

MAX_PROMPT_CHARS = 200
MAX_PROMPTS = 32
NUM_IMAGES_RANGE = (1, 8)
STEPS_RANGE = (1, 1000)
GUIDANCE_RANGE = (0.0, 20.0)
ETA_RANGE = (0.0, 1.0)
SEED_RANGE = (0, 2**63 - 1)
SAMPLERS = ("ddpm", "ddim")
# name -> (type, range or choices); None values mean "the pipeline's saved default".
OPTION_RULES: dict[str, tuple[type, tuple]] = {
    "num_images": (int, NUM_IMAGES_RANGE),
    "seed": (int, SEED_RANGE),
    "prior_guidance": (float, GUIDANCE_RANGE),
    "decoder_guidance": (float, GUIDANCE_RANGE),
    "sampler": (str, SAMPLERS),
    "steps": (int, STEPS_RANGE),
    "eta": (float, ETA_RANGE),
}


class InvalidRequest(ValueError):
    """A request option outside its limits; the message names the field and the limit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.reason = field, message


def check_prompt(prompt, *, field: str = "prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest(field, "must be a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(field, f"at most {MAX_PROMPT_CHARS} characters (got {len(prompt)})")
    try:  # JSON's "\ud800" decodes to a lone surrogate, which no response can echo back
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(field, f"must be valid Unicode text (a lone surrogate at "
                                    f"character {exc.start})") from None
    return prompt


def _check_option(name: str, value):
    kind, rule = OPTION_RULES[name]
    if kind is str:
        if value not in rule:
            raise InvalidRequest(name, f"must be one of {', '.join(rule)} (got {value!r})")
        return value
    # JSON true/false are ints in Python; a boolean seed or step count is a client bug.
    number_ok = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int and number_ok and float(value).is_integer():
        value = int(value)
    elif kind is float and number_ok and math.isfinite(value):
        value = float(value)
    else:
        raise InvalidRequest(name, f"must be {'an integer' if kind is int else 'a number'} "
                                   f"(got {value!r})")
    low, high = rule
    if not low <= value <= high:
        raise InvalidRequest(name, f"must be between {low} and {high} (got {value})")
    return value


def check_options(options: dict | None) -> dict:
    """Validated generation options; unknown names are errors, None means the default."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_RULES))
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown option; known: {', '.join(OPTION_RULES)}")
    return {name: _check_option(name, value) for name, value in options.items()
            if value is not None}


def check_model_limits(pipeline, options: dict) -> None:
    """Limits that depend on the loaded model: sampling steps up to its decoder's timesteps."""
    limit = pipeline.decoder.decoder_config.num_timesteps
    steps = options.get("steps")
    if steps is not None and steps > limit:
        raise InvalidRequest("steps", f"at most {limit} for this model, whose decoder has "
                                      f"{limit} timesteps (got {steps})")


def generate_kwargs(options: dict) -> dict:
    """Checked options -> keyword arguments of `UnCLIPPipeline.generate`."""
    kwargs = {k: v for k, v in options.items() if k != "num_images"}
    kwargs["num_images_per_prompt"] = options.get("num_images", 1)
    kwargs.setdefault("seed", 0)
    return kwargs


def encode_png(image) -> bytes:
    """One [H, W, 3] uint8 tensor or array -> PNG bytes (deterministic for equal pixels)."""
    from PIL import Image

    array = image.numpy() if hasattr(image, "numpy") else image
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def prompts_from_input(model_input) -> list[str]:
    """A DataFrame with a `prompt` column, a list of strings, a string or {"prompt": ...}."""
    if isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            raise InvalidRequest("prompt", "the input needs a 'prompt' column")
        # MLflow turns {"prompt": [a, b]} into one row holding the whole list: flatten it.
        prompts = []
        for cell in model_input["prompt"].tolist():
            cell = cell.tolist() if hasattr(cell, "tolist") else cell  # numpy array cells
            prompts.extend(cell if isinstance(cell, list | tuple) else [cell])
    elif isinstance(model_input, dict):
        if "prompt" not in model_input:
            raise InvalidRequest("prompt", "the input needs a 'prompt' key")
        value = model_input["prompt"]
        prompts = [value] if isinstance(value, str) else list(value)
    elif isinstance(model_input, str):
        prompts = [model_input]
    else:
        prompts = list(model_input)
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise InvalidRequest("prompt", f"between 1 and {MAX_PROMPTS} prompts per call "
                                       f"(got {len(prompts)})")
    return [check_prompt(p) for p in prompts]


def model_signature(sampling: dict | None = None) -> ModelSignature:
    """Input: prompt strings; params: the generation options; output: one row per image.

    Param defaults are the pipeline's saved sampling settings where it has one, so the
    signature documents what a request without params gets.
    """
    sampling = sampling or {}
    defaults = {"num_images": 1, "seed": 0, "prior_guidance": sampling.get("prior_guidance"),
                "decoder_guidance": sampling.get("decoder_guidance"),
                "sampler": sampling.get("sampler"), "steps": sampling.get("steps"),
                "eta": sampling.get("eta")}
    dtypes = {int: "long", float: "double", str: "string"}
    params = ParamSchema([ParamSpec(name, dtypes[kind], defaults[name])
                          for name, (kind, _) in OPTION_RULES.items()])
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "image_index"),
                        ColSpec("string", "png_base64")]),
        params=params,
    )


class UnCLIPPyfunc(PythonModel):
    # The signature is explicit (model_signature): MLflow's type-hint validation, and its
    # warning that predict has no type hints, do not apply.
    _skip_type_hint_validation = True

    def load_context(self, context):
        import torch

        from models.unclip_pipeline import UnCLIPPipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipeline = UnCLIPPipeline.load(context.artifacts[PIPELINE_ARTIFACT],
                                            map_location=device)

    def predict(self, context, model_input, params=None):
        try:
            prompts = prompts_from_input(model_input)
            options = check_options(params)
            check_model_limits(self.pipeline, options)
        except InvalidRequest as exc:
            # An MlflowException is what `mlflow models serve` answers with its own message
            # (HTTP 400, INVALID_PARAMETER_VALUE); any other error becomes its generic
            # "unexpected error" with the reason buried in a stack trace.
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        images = self.pipeline.generate(prompts, **generate_kwargs(options))
        per_prompt = options.get("num_images", 1)
        rows = [(prompts[i // per_prompt], i % per_prompt,
                 base64.b64encode(encode_png(image)).decode("ascii"))
                for i, image in enumerate(images)]
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


mlflow.models.set_model(UnCLIPPyfunc())
