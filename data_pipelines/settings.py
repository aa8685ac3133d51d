"""Typed settings for dataset building and preprocessing (composed into the job config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("rectangle", "square", "triangle", "circle", "ellipse", "pentagon")


class ShapesSettings(BaseModel):
    """The synthetic dataset of Luo 2023 (sec. 3.1): coloured shapes on grey with generated
    captions."""

    model_config = ConfigDict(extra="forbid")

    train_size: int = Field(20_000, ge=1)
    test_size: int = Field(2_000, ge=1)
    image_size: int = Field(32, ge=16, le=512)
    max_shapes: int = Field(2, ge=1, le=2)
    include_position: bool = False
    # (colour, shape) pairs never drawn in train, for zero-shot tests
    held_out: list[tuple[str, str]] = [("white", "rectangle"), ("yellow", "circle"),
                                       ("purple", "triangle")]
    samples_per_shard: int = Field(1000, ge=1)
    image_format: Literal["png", "jpg"] = "png"
    seed: int = 0

    @model_validator(mode="after")
    def _known_pairs(self) -> ShapesSettings:
        for colour, shape in self.held_out:
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(
                    f"held_out: unknown pair ({colour}, {shape}); colours are {', '.join(COLOURS)}"
                    f" and shapes are {', '.join(SHAPES)}"
                )
        return self


class PreprocessSettings(BaseModel):
    """What happens to an image and caption between the shard and the model."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(32, ge=8, le=1024)
    random_crop: bool = False  # random crop, then resize (Grazys 2023, sec. 3.2)
    crop_scale: tuple[float, float] = (0.6, 1.0)
    hflip: bool = True
    context_length: int = Field(32, ge=4, le=77)

    @model_validator(mode="after")
    def _crop_scale_range(self) -> PreprocessSettings:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale: need 0 < low <= high <= 1, got {self.crop_scale}")
        return self
