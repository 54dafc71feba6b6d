"""Check an antidote against the model vLLM serves, from its config and checkpoint files.

vLLM fuses and shards weights (one qkv matrix, vocabulary split across tensor-parallel ranks), so the weights
probe that `Antidote.validate` reads from a transformers model is read here from the checkpoint's safetensors
files instead: the same tensors (input embeddings, the last block's first matrix), found by building the
transformers model on the meta device (no memory, no weights) to learn their names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def checkpoint_dir(model: str) -> Path:
    """The local directory of `model` (a path, or a hub id already in the local cache; nothing is downloaded)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True))


def _tensor(directory: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        file = directory / json.loads(index.read_text())["weight_map"][name]
    else:
        file = directory / "model.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(name)


def checkpoint_identity(model: str, hf_config: Any) -> dict[str, Any]:
    """models.model_identity_light's fields for the checkpoint `model` with transformers config `hf_config`."""
    from transformers import AutoModelForCausalLM

    from ..models import _probe_tensors, weights_probe

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    names = {id(p): n for n, p in skeleton.named_parameters()}  # tied weights: the first (stored) name
    directory = checkpoint_dir(model)
    real = [_tensor(directory, names[id(p)]) for p in _probe_tensors(skeleton)]
    probe = weights_probe(None, tensors=real)
    return {"name": model, "hidden_size": int(hf_config.hidden_size), "num_layers": int(hf_config.num_hidden_layers),
            "weights_probe": probe}  # fmt: skip


def check_served_model(antidote: Any, model: str, hf_config: Any) -> None:
    """Raise ArtifactMismatch (one line: which model the antidote was fitted on, and the fix) unless the model
    vLLM serves is the one `antidote` was fitted on."""
    try:
        here = checkpoint_identity(model, hf_config)
    except Exception as error:  # a checkpoint layout we cannot read: size checks only, said in the log
        import logging

        logging.getLogger("jailbreak_antidote.vllm").warning(
            "antidote: could not read the weights probe from %s (%s); checking sizes only", model, error
        )
        here = {"hidden_size": int(hf_config.hidden_size), "num_layers": int(hf_config.num_hidden_layers)}
    antidote.check_identity(here)
