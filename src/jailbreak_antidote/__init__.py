"""jailbreak-antidote: run-time jailbreak defense by sparse representation adjustment."""

from .antidote import Antidote
from .errors import (
    AntidoteError,
    ArtifactError,
    ArtifactMismatch,
    BundledModelMissing,
    InvalidParameter,
    ModelLoadError,
    PromptFileError,
    UnsupportedArchitecture,
)
from .fit import fit_antidote
from .generate import Sampling, generate, generate_grid
from .models import load_model, render_prompt
from .prompts import builtin_calibration, read_prompts
from .steer import Steering

__all__ = [
    "Antidote",
    "AntidoteError",
    "ArtifactError",
    "ArtifactMismatch",
    "BundledModelMissing",
    "InvalidParameter",
    "ModelLoadError",
    "PromptFileError",
    "Sampling",
    "Steering",
    "UnsupportedArchitecture",
    "builtin_calibration",
    "fit_antidote",
    "generate",
    "generate_grid",
    "load_model",
    "read_prompts",
    "render_prompt",
]
