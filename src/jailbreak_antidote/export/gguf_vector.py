"""llama.cpp control vectors: a GGUF file with general.architecture = "controlvector" and one dense F32
tensor `direction.<L>` (length n_embd) per steered layer.

Layer convention (checked against llama.cpp by tests/test_llamacpp.py, not just read from its source):
llama.cpp adds `direction.<L>` to the output of decoder block L, counting blocks from 0 as transformers
does, so our block index L is written as `direction.<L>` unchanged. llama.cpp cannot steer block 0
(it rejects `direction.0`), so an antidote that steers block 0 is refused unless `skip_layer_0` drops it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..antidote import Antidote
from ..errors import ArtifactError, InvalidParameter
from ..steer import check_alpha

ARCHITECTURE = "controlvector"


def control_vector_rows(antidote: Antidote, alpha: float = 1.0, skip_layer_0: bool = False) -> dict[int, np.ndarray]:
    """{llama.cpp layer: alpha * sparse vector as float32}, zeros outside the sparse mask."""
    value = check_alpha(alpha)
    vectors = antidote.vectors()
    if 0 in vectors:
        if not skip_layer_0:
            raise InvalidParameter(
                "this antidote steers block 0, which llama.cpp cannot steer (it rejects direction.0); "
                "export with --skip-layer-0 (the exported steering then differs from the artifact), "
                "or refit with a smaller --layer-top-p"
            )
        vectors = {layer: v for layer, v in vectors.items() if layer != 0}
    return {layer: (float(value) * v.float()).numpy().astype(np.float32) for layer, v in sorted(vectors.items())}


def export_gguf(antidote: Antidote, path: str | Path, alpha: float = 1.0, skip_layer_0: bool = False) -> Path:
    """Write a llama.cpp control vector holding alpha * v per layer (llama.cpp may scale it again)."""
    import gguf

    rows = control_vector_rows(antidote, alpha, skip_layer_0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", str(antidote.model.get("model_type", "")))
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(rows))
        writer.add_float32("antidote.alpha", float(alpha))
        writer.add_float32("antidote.k", float(antidote.k))
        writer.add_string("antidote.model", str(antidote.model.get("name", "")))
        for layer, row in rows.items():
            writer.add_tensor(f"direction.{layer}", row)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def read_gguf_control_vector(path: str | Path) -> dict[int, np.ndarray]:
    """{layer: vector} from a control-vector GGUF (ours or any other tool's)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a readable GGUF file ({exc})") from None
    field = reader.fields.get("general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    if architecture != ARCHITECTURE:
        raise ArtifactError(f"{path} is a GGUF of architecture {architecture!r}, not a control vector")
    rows = {}
    for tensor in reader.tensors:
        if tensor.name.startswith("direction."):
            rows[int(tensor.name.split(".", 1)[1])] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    return rows
