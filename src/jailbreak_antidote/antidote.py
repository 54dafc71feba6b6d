"""The Antidote value object: per-layer sparse safety vectors plus metadata; save, load, validate."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import ArtifactError, ArtifactMismatch, InvalidParameter
from .probe import HarmProbe
from .steer import MODES, POSITIONS, Alpha, Gate, Steering, check_positions, check_refuse_threshold

FORMAT = "jailbreak-antidote"
# Version 2 adds readouts (input-dependent methods) and a tuned positions policy; version 3 a tuned refuse
# threshold. A file is written with the lowest version that holds what it uses, so older versions of the
# package keep reading it, and refuse (not silently misread) what they cannot apply.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
SELECTORS = ("top", "random")
PROBE_TENSORS = {"probe.weight", "probe.mean", "probe.std"}


def check_k(k: float) -> float:
    if isinstance(k, bool) or not isinstance(k, int | float) or not 0 < k <= 1:
        raise InvalidParameter(f"k must be in (0, 1] (the fraction of coordinates kept), got {k!r}")
    return float(k)


def sparse_mask(direction: torch.Tensor, k: float, selector: str, seed: int) -> torch.Tensor:
    """Boolean mask keeping int(k * hidden) coordinates: the largest |d| ('top') or a seeded random set."""
    hidden = direction.numel()
    keep = int(check_k(k) * hidden)
    if keep < 1:
        raise InvalidParameter(f"k={k} keeps no coordinate of a {hidden}-dim vector; use k >= {1 / hidden:.4g}")
    if selector == "top":
        index = direction.abs().topk(keep).indices
    elif selector == "random":
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(hidden, generator=generator)[:keep]
    else:
        raise InvalidParameter(f"selector must be one of {SELECTORS}, got {selector!r}")
    mask = torch.zeros(hidden, dtype=torch.bool)
    mask[index] = True
    return mask


def check_tuned(tuned: Any, what: str) -> None:
    """InvalidParameter unless `tuned` is an operating point generate, eval and serve can apply: a known
    mode, a finite alpha, a threshold in [0, 1] (or none), a known positions policy, a refuse threshold in
    [0, 1] (or none). The metadata is not under the artifact's checksum, so a hand edit must not get further."""
    if not isinstance(tuned, dict):
        raise InvalidParameter(f"{what} must be a table of mode, alpha, threshold, ..., got {tuned!r}")
    if tuned.get("mode") not in MODES:
        raise InvalidParameter(f"{what}: mode must be one of {', '.join(MODES)}, got {tuned.get('mode')!r}")
    alpha = tuned.get("alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise InvalidParameter(f"{what}: alpha must be a finite number, got {alpha!r}")
    threshold = tuned.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                  or not 0 <= threshold <= 1):  # fmt: skip
        raise InvalidParameter(f"{what}: threshold must be a probability in [0, 1] or null, got {threshold!r}")
    if tuned.get("positions", "all") not in POSITIONS:
        raise InvalidParameter(f"{what}: positions must be one of {', '.join(POSITIONS)}, got {tuned['positions']!r}")
    try:
        check_refuse_threshold(tuned.get("refuse_threshold"))
    except InvalidParameter as exc:
        raise InvalidParameter(f"{what}: {exc}") from None


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Antidote:
    """Sparse safety directions for some decoder blocks of one model.

    directions[i] is the (unmasked) direction for block layers[i]; masks[i] selects the coordinates that
    are steered. The vector added at run time is alpha * directions[i] * masks[i]; alpha > 0 is safer.
    With readouts (method null_space), it is alpha * (h . readouts[i]) * directions[i] * masks[i], h being
    block layers[i]'s output at the prompt's last token (see `steer.Steering`).
    """

    layers: list[int]
    directions: torch.Tensor  # float32 [len(layers), hidden]
    masks: torch.Tensor  # bool [len(layers), hidden]
    k: float
    selector: str = "top"
    method: str = "pca"
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)  # identity of the model it was fitted on
    alpha: dict[str, Any] = field(default_factory=dict)  # suggested value, range, and how they were derived
    stats: dict[str, Any] = field(default_factory=dict)  # calibration statistics per layer
    chat: dict[str, Any] = field(default_factory=dict)  # chat formatting used when fitting
    provenance: dict[str, Any] = field(default_factory=dict)
    probe: HarmProbe | None = None  # optional harm probe (`antidote probe`), read at run time by adaptive modes
    readouts: torch.Tensor | None = None  # float32 [len(layers), hidden]: input-dependent strength (null_space)

    @classmethod
    def fit(cls, model: nn.Module, tokenizer: Any, harmful: list[str], harmless: list[str], **kwargs: Any) -> Antidote:
        """Fit from paired prompts; see `jailbreak_antidote.fit.fit_antidote` for the options."""
        from .fit import fit_antidote

        return fit_antidote(model, tokenizer, harmful, harmless, **kwargs)

    # ----- vectors ---------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.directions.shape[1])

    @property
    def suggested_alpha(self) -> float:
        return float(self.alpha.get("suggested", 1.0))

    @property
    def tuned(self) -> dict[str, Any] | None:
        """The operating point `antidote tune` chose (mode, alpha, threshold), if it was run."""
        return self.alpha.get("tuned")

    @property
    def default_alpha(self) -> float:
        """What generate, eval and serve use when no alpha is given: the tuned alpha, else the suggested one."""
        return float(self.tuned["alpha"]) if self.tuned else self.suggested_alpha

    @property
    def default_positions(self) -> str:
        """The positions policy used when none is given: the tuned one, else "all" (the paper)."""
        return str((self.tuned or {}).get("positions") or "all")

    @property
    def default_refuse_threshold(self) -> float | None:
        """The harm probability from which a prompt is refused without generating, when none is given: the
        tuned one, else None (never)."""
        return check_refuse_threshold((self.tuned or {}).get("refuse_threshold"))

    def without_refusals(self) -> Antidote:
        """This antidote with the best steering-only point of its stored tune curve as its default (what `antidote
        tune --no-refuse` would have chosen), for running without outright refusals: the point tuned jointly with
        refusals is weaker alone. Itself when its default does not refuse."""
        if self.default_refuse_threshold is None:
            return self
        from .tune import steering_only

        point = {key: value for key, value in steering_only(self.tuned).items() if key != "refuse_threshold"}
        return replace(self, alpha={**self.alpha, "tuned": {**self.tuned, **point, "refuse_threshold": None}})

    @property
    def default_mode(self) -> tuple[str, float]:
        """(mode, threshold) used when none is given: the tuned ones, else ("fixed", 0.5)."""
        if self.tuned:
            return str(self.tuned["mode"]), float(self.tuned.get("threshold") or 0.5)
        return "fixed", 0.5

    def vectors(self) -> dict[int, torch.Tensor]:
        """{block index: the sparse vector added per unit of alpha}."""
        sparse = self.directions * self.masks
        return {layer: sparse[i] for i, layer in enumerate(self.layers)}

    def readout_vectors(self) -> dict[int, torch.Tensor] | None:
        """{block index: readout vector [hidden]} of an input-dependent antidote, else None."""
        if self.readouts is None:
            return None
        return {layer: self.readouts[i] for i, layer in enumerate(self.layers)}

    def with_k(self, k: float, selector: str | None = None) -> Antidote:
        """The same directions re-masked to keep int(k * hidden) coordinates; nothing is refitted."""
        selector = selector or self.selector
        masks = torch.stack(
            [sparse_mask(d, k, selector, self.seed + layer) for d, layer in zip(self.directions, self.layers)]
        )
        return replace(self, masks=masks, k=float(k), selector=selector)

    # ----- arithmetic, like repeng's ControlVector -------------------------------------------------
    def __mul__(self, factor: float) -> Antidote:
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not math.isfinite(factor):
            return NotImplemented
        return self._derived(self.layers, self.directions * float(factor), self.masks, f"* {factor}")

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> Antidote:
        if not isinstance(divisor, int | float) or divisor == 0:
            return NotImplemented
        return self * (1.0 / divisor)

    def __neg__(self) -> Antidote:
        return self * -1.0

    def __add__(self, other: Antidote) -> Antidote:
        if not isinstance(other, Antidote):
            return NotImplemented
        if self.readouts is not None or other.readouts is not None:
            raise InvalidParameter(
                "cannot add input-dependent (null_space) antidotes: their strengths are read per layer from "
                "the prompt; scale one with * instead"
            )
        if other.hidden_size != self.hidden_size or other.model.get("num_layers") != self.model.get("num_layers"):
            raise ArtifactMismatch("cannot add antidotes fitted on different models (hidden size or depth differ)")
        layers = sorted(set(self.layers) | set(other.layers))
        directions = torch.zeros(len(layers), self.hidden_size)
        masks = torch.zeros(len(layers), self.hidden_size, dtype=torch.bool)
        for source in (self, other):
            for i, layer in enumerate(source.layers):
                j = layers.index(layer)
                directions[j] += source.directions[i] * source.masks[i]
                masks[j] |= source.masks[i]
        return self._derived(layers, directions, masks, "+ other antidote")

    def __sub__(self, other: Antidote) -> Antidote:
        return self + (-other)

    def _derived(self, layers: list[int], directions: torch.Tensor, masks: torch.Tensor, op: str) -> Antidote:
        provenance = copy.deepcopy(self.provenance)
        provenance.setdefault("derived", []).append(op)
        return replace(self, layers=list(layers), directions=directions, masks=masks, provenance=provenance)

    def probe_for(self, other: Antidote) -> HarmProbe:
        """This artifact's harm probe, for `other` (an antidote of another fit method on the same model). The
        probe reads the unsteered model's states, so it does not depend on the direction.

        Raises InvalidParameter if this artifact has no probe, ArtifactMismatch if the two were fitted on
        different models (name, size or weights)."""
        if self.probe is None:
            raise InvalidParameter("the --from antidote has no harm probe; add one with `antidote probe FILE`")
        keys = ("name", "hidden_size", "num_layers", "weights_probe")
        mine, theirs = ({k: a.model.get(k) for k in keys} for a in (self, other))
        if mine != theirs:
            raise ArtifactMismatch(
                f"the --from antidote was fitted on {mine['name'] or 'another model'}, this one on "
                f"{theirs['name'] or 'another model'} (or on other weights); a probe only serves its own model"
            )
        return self.probe

    # ----- application ----------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Raise ArtifactMismatch unless `model` is the model this antidote was fitted on."""
        from .models import model_identity_light

        self.check_identity(model_identity_light(model))

    def check_identity(self, here: dict[str, Any]) -> None:
        """Raise ArtifactMismatch unless `here` (models.model_identity_light of a model, or the same fields read
        another way, as the vLLM plugin does from the checkpoint files) is the model this antidote was fitted
        on: hidden size, number of blocks and, with a tolerance, a few weights."""
        expected = self.model
        fix = "fit an antidote for this model (`antidote fit --model ...`) or load the model it was fitted on"
        for key in ("hidden_size", "num_layers"):
            if expected.get(key) != here[key]:
                raise ArtifactMismatch(
                    f"antidote was fitted on {expected.get('name') or 'another model'} with {key}="
                    f"{expected.get(key)}, but this model has {key}={here[key]}; {fix}"
                )
        probe = expected.get("weights_probe")
        if probe:
            ours, theirs = torch.tensor(here["weights_probe"]), torch.tensor(probe)
            scale = float(theirs.abs().max()) or 1.0
            if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-2, atol=1e-2 * scale):
                raise ArtifactMismatch(
                    f"antidote was fitted on {expected.get('name') or 'another model'} "
                    f"({expected.get('architecture')}), whose weights differ from this model's; {fix}"
                )

    def applied(
        self,
        model: nn.Module,
        alpha: Alpha | None = None,
        *,
        validate: bool = True,
        mode: str = "fixed",
        threshold: float = 0.5,
        positions: str | None = None,
    ) -> Steering:
        """Context manager that steers `model` (alpha: number or one value per batch row; default: the
        tuned alpha if `antidote tune` ran, else the suggested one). Hooks are removed on exit, also after an
        exception.

        mode: "fixed" (the paper: alpha everywhere), "gated" (alpha only for prompts whose harm probability
        is at least `threshold`), "scaled" (alpha times that probability) or "monitor" (gated, and the probe
        also reads each generated token: see `steer.Gate`); the adaptive modes need a harm probe (`antidote
        probe`). With a probe, the steering's `scores` hold each row's probability.
        positions: "all", "prompt" or "generated" (steer.POSITIONS; default: the tuned policy, else "all")."""
        if validate:
            self.validate(model)
        return Steering(
            model, self.vectors(), self.default_alpha if alpha is None else alpha, gate=self.gate(mode, threshold),
            positions=check_positions(positions or self.default_positions), readouts=self.readout_vectors(),
        )  # fmt: skip

    def gate(self, mode: str = "fixed", threshold: float = 0.5) -> Gate | None:
        """The run-time gate for `mode` from the harm probe (None: plain fixed steering, no probe)."""
        if mode not in MODES:
            raise InvalidParameter(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if self.probe is None:
            if mode != "fixed":
                raise InvalidParameter(
                    f"mode {mode!r} needs a harm probe, and this antidote has none; add one with "
                    "`antidote probe FILE` (or use mode 'fixed')"
                )
            return None
        return Gate(self.probe.layer, self.probe.probability, mode, threshold, running=self.probe)

    def maybe_applied(
        self, model: nn.Module, alpha: float, mode: str = "fixed", threshold: float = 0.5, positions: str = "all"
    ) -> contextlib.AbstractContextManager:
        """`applied` without validation, or a no-op context when alpha is 0 (evaluation helpers)."""
        if alpha == 0:
            return contextlib.nullcontext()
        return self.applied(model, alpha, validate=False, mode=mode, threshold=threshold, positions=positions)

    # ----- persistence ----------------------------------------------------------------------------
    def format_version(self) -> int:
        """The lowest reader version that applies the file as meant (an older reader would silently steer
        differently, or draw refusing points of the tune curve as steering ones): 3 with a tuned refuse
        threshold or refusing points in the tune curve, 2 with readouts or a tuned positions policy other than
        "all", else 1."""
        curve = (self.tuned or {}).get("curve") or []
        if self.default_refuse_threshold is not None or any(p.get("refuse_threshold") is not None for p in curve):
            return 3
        return 2 if self.readouts is not None or self.default_positions != "all" else 1

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version(),
            "layers": self.layers,
            "k": self.k,
            "selector": self.selector,
            "method": self.method,
            "seed": self.seed,
            "model": self.model,
            "alpha": self.alpha,
            "stats": self.stats,
            "chat": self.chat,
            "provenance": self.provenance,
            "probe": self.probe.metadata() if self.probe is not None else None,
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "directions": self.directions.float().contiguous(),
            "masks": self.masks.to(torch.uint8).contiguous(),
        }
        if self.probe is not None:
            tensors.update({name: t.float().contiguous() for name, t in self.probe.tensors().items()})
        if self.readouts is not None:
            tensors["readouts"] = self.readouts.float().contiguous()
        return tensors

    def fingerprint(self) -> str:
        """sha256 of what decides the antidote's behaviour: its tensors and settings, not when or how fast it
        was fitted. Two fits of the same model and calibration data share it (the file checksum differs)."""
        behaviour = {key: value for key, value in self.metadata().items() if key not in ("provenance", "stats")}
        digest = hashlib.sha256(_tensor_digest(self._tensors()).encode())
        digest.update(json.dumps(behaviour, sort_keys=True).encode())
        return digest.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write a .antidote file (safetensors with JSON metadata) atomically: temp file, then rename."""
        path = Path(path)
        if self.tuned is not None:
            check_tuned(self.tuned, "the tuned default")  # never write what load would refuse
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = self._tensors()
        meta = self.metadata()
        meta["tensors_sha256"] = _tensor_digest(tensors)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": FORMAT, "meta": json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, *, drop_bad_tuned: bool = False) -> Antidote:
        """Read a .antidote file; with `model`, also check that it belongs to that model. A tuned default that
        cannot be applied (a hand edit) is an ArtifactError, or dropped with `drop_bad_tuned` (`antidote tune`,
        which replaces it)."""
        path = Path(path)
        if path.is_dir():
            raise ArtifactError(f"{str(path)!r} is a directory; give the .antidote file written by `antidote fit`")
        if not path.is_file():
            raise ArtifactError(f"antidote file {str(path)!r} does not exist; create one with `antidote fit`")
        refit = "the file is corrupted or truncated; fit it again with `antidote fit`"
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ArtifactError(f"cannot read antidote {str(path)!r}: {refit} ({exc})") from None
        if header.get("format") != FORMAT:
            raise ArtifactError(f"{str(path)!r} is a safetensors file but not an antidote (no '{FORMAT}' header)")
        try:
            meta = json.loads(header["meta"])
        except (KeyError, json.JSONDecodeError):
            raise ArtifactError(f"antidote {str(path)!r} has unreadable metadata: {refit}") from None
        version = meta.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ArtifactError(
                f"antidote {str(path)!r} has format version {version}, this jailbreak-antidote reads versions "
                f"{' and '.join(map(str, READABLE_VERSIONS))}; upgrade the package (pip install -U "
                "jailbreak-antidote) or refit the antidote"
            )
        expected = {"directions", "masks"} | (PROBE_TENSORS if meta.get("probe") else set())
        expected |= {"readouts"} if "readouts" in tensors and version >= 2 else set()
        if set(tensors) != expected or meta.get("tensors_sha256") != _tensor_digest(tensors):
            raise ArtifactError(f"antidote {str(path)!r} failed its checksum: {refit}")
        directions, masks = tensors["directions"], tensors["masks"].bool()
        layers = [int(layer) for layer in meta["layers"]]
        readouts = tensors.get("readouts")
        if (directions.shape != masks.shape or directions.shape[0] != len(layers)
                or (readouts is not None and readouts.shape != directions.shape)):  # fmt: skip
            raise ArtifactError(f"antidote {str(path)!r} has inconsistent shapes: {refit}")
        if isinstance(meta.get("alpha"), dict) and meta["alpha"].get("tuned") is not None:
            try:
                check_tuned(meta["alpha"]["tuned"], "its tuned default")
            except InvalidParameter as exc:
                if not drop_bad_tuned:
                    raise ArtifactError(f"antidote {str(path)!r}: {exc}; run `antidote tune` on it again (it "
                                        "replaces the tuned default)") from None  # fmt: skip
                meta["alpha"] = {key: value for key, value in meta["alpha"].items() if key != "tuned"}
        antidote = cls(
            layers=layers,
            directions=directions,
            masks=masks,
            k=float(meta["k"]),
            selector=meta["selector"],
            method=meta["method"],
            seed=int(meta["seed"]),
            model=meta["model"],
            alpha=meta["alpha"],
            stats=meta["stats"],
            chat=meta["chat"],
            provenance=meta["provenance"],
            probe=HarmProbe.from_parts(meta["probe"], tensors) if meta.get("probe") else None,
            readouts=readouts,
        )
        if model is not None:
            antidote.validate(model)
        return antidote

    def summary(self) -> dict[str, Any]:
        """What `antidote inspect --json` prints: everything but the raw vectors and per-layer arrays."""
        nonzeros = self.masks.sum(dim=1).tolist()
        kept_norms = (self.directions * self.masks).norm(dim=1).tolist()
        return {
            "model": {k: v for k, v in self.model.items() if k != "weights_probe"},
            "layers": self.layers,
            "num_layers_selected": len(self.layers),
            "k": self.k,
            "selector": self.selector,
            "method": self.method,
            "input_dependent": self.readouts is not None,
            "default_positions": self.default_positions,
            "nonzeros_per_layer": nonzeros,
            "masked_norm_per_layer": [round(x, 4) for x in kept_norms],
            "alpha": self.alpha,
            "layer_accuracy": self.stats.get("layer_accuracy", {}),
            "chat": self.chat,
            "provenance": self.provenance,
            "probe": None if self.probe is None else {"layer": self.probe.layer, **self.probe.report},
        }
