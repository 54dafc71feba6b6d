"""Shared set-up for the benchmark scripts: machine description and the bundled model + antidote."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{datetime.now(UTC):%Y-%m-%d}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )


def bundled_model_and_antidote(model_name: str):
    from jailbreak_antidote.fit import fit_antidote
    from jailbreak_antidote.models import load_model
    from jailbreak_antidote.prompts import builtin_calibration

    model, tokenizer = load_model(model_name)
    calibration = builtin_calibration()
    antidote = fit_antidote(model, tokenizer, calibration.harmful, calibration.harmless)
    return model, tokenizer, antidote
