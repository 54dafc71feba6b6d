"""Per-tenant steering policies and staged rollout (`antidote serve --policy policy.toml`).

A policy maps each caller to a *tenant*, by API key (`api_keys = [...]` per tenant) or by a request header
(`tenant_header = "X-Tenant"`), and gives every tenant a default setting (alpha, mode, threshold,
positions, refuse_threshold), the alpha range its requests may ask for, and whether a request may override
the default at all. A tenant may also name a *candidate* setting and the share of its traffic that gets it (a staged
rollout: pilot -> canary -> full): the arm of each request is drawn from a hash of the tenant, the
rollout's name and the request's `user` field (or its request id when it sends none), so one user stays in
one arm for as long as the rollout keeps its name and share. The file format is in docs/SERVING.md.

Every problem in the file is an `InvalidParameter` naming the file, the key and the fix; the server checks
the file at start and keeps its last good policy when a reload (SIGHUP) fails.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidParameter
from ..steer import POSITIONS

MODES = ("fixed", "gated", "scaled", "monitor")
ARMS = ("baseline", "candidate", "override")  # override: the request set its own setting
ASSIGN_BY = ("user", "request")
SETTING_KEYS = ("alpha", "mode", "threshold", "positions", "refuse_threshold")
NEVER = "never"  # refuse_threshold's value for "do not refuse outright" (TOML and JSON requests alike)
TENANT_KEYS = {*SETTING_KEYS, "api_keys", "alpha_range", "allow_override", "rollout"}
ROLLOUT_KEYS = {*SETTING_KEYS, "share", "name", "assign_by"}
DEFAULT_TENANT = "default"
# Names that are safe as metric labels, in plots and in a header; keys and header values a client can send
# as they are written (visible ASCII: HTTP headers are not UTF-8, and the server strips surrounding spaces).
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
API_KEY = re.compile(r"[!-~]{1,512}")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")  # an RFC 9110 token


class PolicyError(InvalidParameter):
    """A policy file that cannot be used: its message names the file, the key and the fix."""


@dataclass(frozen=True)
class Setting:
    """What the antidote does for one request: strength, mode (and its threshold), positions policy and the
    harm probability from which the prompt is refused outright (None: never)."""

    alpha: float
    mode: str = "fixed"
    threshold: float = 0.5
    positions: str = "all"
    refuse_threshold: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "mode": self.mode, "threshold": self.threshold, "positions": self.positions,
                "refuse_threshold": self.refuse_threshold}  # fmt: skip


@dataclass(frozen=True)
class Rollout:
    """A candidate setting served to `share` of a tenant's traffic."""

    candidate: Setting
    share: float
    name: str
    assign_by: str = "user"

    def arm(self, tenant: str, unit: str) -> str:
        """The arm ("candidate" or "baseline") of this assignment unit (user id or request id): a uniform draw from a
        hash, stable for as long as the tenant, the rollout's name and its share stay the same."""
        digest = hashlib.sha256(f"{tenant}\0{self.name}\0{unit}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        return "candidate" if draw < self.share else "baseline"


@dataclass(frozen=True)
class Tenant:
    name: str
    setting: Setting
    alpha_range: tuple[float, float]
    allow_override: bool = True
    rollout: Rollout | None = None

    def assign(self, user: str | None, request_id: str) -> tuple[str, Setting]:
        """(arm, setting) of one request."""
        if self.rollout is None or self.rollout.share == 0:
            return "baseline", self.setting
        unit = user if self.rollout.assign_by == "user" and user else request_id
        arm = self.rollout.arm(self.name, unit)
        return arm, self.rollout.candidate if arm == "candidate" else self.setting


@dataclass(frozen=True)
class ServerLimits:
    """What the served model and artifact allow, against which a policy is checked."""

    alpha_min: float
    alpha_max: float
    probe: bool  # the artifact has a harm probe: gated, scaled and monitor modes are possible
    any_positions: bool  # False on llama.cpp (a control vector steers every position)
    default: Setting
    server_key: bool = False  # --api-key is set: a policy may not give keys to tenants as well


@dataclass(frozen=True)
class Policy:
    tenants: dict[str, Tenant]
    keys: dict[str, str] = field(default_factory=dict)  # API key -> tenant name
    tenant_header: str | None = None
    source: str = "<built-in>"

    @property
    def labels(self) -> list[str]:
        return sorted(self.tenants)


def single_tenant(limits: ServerLimits) -> Policy:
    """The policy of a server started without --policy: one tenant, the server's default and range."""
    tenant = Tenant(DEFAULT_TENANT, limits.default, (limits.alpha_min, limits.alpha_max))
    return Policy({DEFAULT_TENANT: tenant})


def load_policy(path: Path, limits: ServerLimits) -> Policy:
    """Read and check a policy file; PolicyError (one line: file, key, fix) on any problem."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"policy file {where!r} does not exist; give the path of a TOML policy "
                          "(docs/SERVING.md shows one)") from None  # fmt: skip
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"policy file {where!r} cannot be read ({type(exc).__name__}); give a readable UTF-8 "
                          "TOML file") from None  # fmt: skip
    try:
        data = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer literal too long to convert
        raise PolicyError(f"policy file {where!r} is not valid TOML ({_show(exc)}); fix the syntax there") from None
    return parse_policy(data, limits, where)


def parse_policy(data: dict[str, Any], limits: ServerLimits, where: str = "<policy>") -> Policy:
    _only(data, {"tenant_header", "tenants"}, where, "the top level")
    header = data.get("tenant_header")
    if header is not None and not (isinstance(header, str) and HEADER_NAME.fullmatch(header)):
        raise PolicyError(f'{where}: tenant_header must be an HTTP header name such as "X-Tenant" (letters, digits '
                          f"and - only, no spaces or colon), got {_show(header)}")  # fmt: skip
    tables = data.get("tenants")
    if not isinstance(tables, dict) or not tables:
        raise PolicyError(f"{where}: no tenants; add at least one [tenants.NAME] table")
    tenants: dict[str, Tenant] = {}
    keys: dict[str, str] = {}
    for name, table in tables.items():
        at = f"{where}: tenants.{name}"
        if not TENANT_NAME.fullmatch(name):
            raise PolicyError(f"{where}: tenant name {_show(name)} must be 1 to 64 ASCII letters, digits, '.', "
                              "'_' or '-', starting with a letter or digit (it is a metric label and a header "
                              "value)")  # fmt: skip
        if not isinstance(table, dict):
            raise PolicyError(f"{at} must be a table ([tenants.{name}])")
        _only(table, TENANT_KEYS, where, f"tenants.{name}")
        tenants[name] = _tenant(name, table, limits, where)
        for key in _api_keys(table, at, by_header=header is not None):
            if key in keys:
                raise PolicyError(f"{where}: API key {_masked(key)} is listed for both tenants.{keys[key]} and "
                                  f"tenants.{name}; give each key to one tenant")  # fmt: skip
            keys[key] = name
    if keys and limits.server_key:
        raise PolicyError(f"{where} gives its tenants API keys, so the server's --api-key (or ANTIDOTE_API_KEY) "
                          "would be a second, tenant-less key; drop --api-key or use tenant_header")  # fmt: skip
    if header is None:
        keyless = [name for name, table in tables.items() if not table.get("api_keys")]
        if keyless:
            raise PolicyError(f"{where}: tenants.{keyless[0]} has no api_keys; callers are told apart by API key "
                              "unless tenant_header is set, so give every tenant at least one key")  # fmt: skip
    return Policy(tenants, keys, header, where)


def _tenant(name: str, table: dict[str, Any], limits: ServerLimits, where: str) -> Tenant:
    at = f"{where}: tenants.{name}"
    low, high = limits.alpha_min, limits.alpha_max
    if "alpha_range" in table:
        value = table["alpha_range"]
        if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)):
            raise PolicyError(f"{at}.alpha_range must be two finite numbers [low, high]")
        low, high = float(value[0]), float(value[1])
        if not limits.alpha_min <= low <= high <= limits.alpha_max:
            raise PolicyError(f"{at}.alpha_range [{low:g}, {high:g}] must lie within the server's alpha range "
                              f"[{limits.alpha_min:g}, {limits.alpha_max:g}] (--alpha-min / --alpha-max) with low <= "
                              "high")  # fmt: skip
    allow = table.get("allow_override", True)
    if not isinstance(allow, bool):
        raise PolicyError(f"{at}.allow_override must be true or false")
    setting = _setting(table, limits.default, limits, (low, high), at)
    rollout = None
    if "rollout" in table:
        rollout = _rollout(table["rollout"], setting, limits, (low, high), where, f"tenants.{name}.rollout")
    return Tenant(name, setting, (low, high), allow, rollout)


def _rollout(
    table: Any, baseline: Setting, limits: ServerLimits, allowed: tuple[float, float], where: str, what: str
) -> Rollout:  # fmt: skip
    at = f"{where}: {what}"
    if not isinstance(table, dict):
        raise PolicyError(f"{at} must be a table ([{what}])")
    _only(table, ROLLOUT_KEYS, where, what)
    share = table.get("share")
    if not _is_number(share) or not 0 <= share <= 1:
        raise PolicyError(f"{at}.share must be the share of traffic in [0, 1] that gets the candidate (0.1 = 10%), "
                          f"got {_show(share)}")  # fmt: skip
    name = table.get("name", "rollout")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{at}.name must be a non-empty string (it salts the assignment)")
    assign_by = table.get("assign_by", "user")
    if assign_by not in ASSIGN_BY:
        raise PolicyError(f"{at}.assign_by must be one of {', '.join(ASSIGN_BY)}, got {_show(assign_by)}")
    candidate = _setting(table, baseline, limits, allowed, f"{at} (the candidate)")
    return Rollout(candidate, float(share), name, assign_by)


def _setting(
    table: dict[str, Any], base: Setting, limits: ServerLimits, allowed: tuple[float, float], at: str
) -> Setting:  # fmt: skip
    alpha = table.get("alpha", base.alpha)
    if not _is_number(alpha):
        raise PolicyError(f"{at}: alpha must be a finite number, got {_show(alpha)}")
    if not allowed[0] <= alpha <= allowed[1]:
        raise PolicyError(f"{at}: alpha {alpha:g} is outside the allowed range [{allowed[0]:g}, {allowed[1]:g}]; "
                          "choose an alpha inside it or widen alpha_range")  # fmt: skip
    mode = table.get("mode", base.mode)
    if mode not in MODES:
        raise PolicyError(f"{at}: mode must be one of {', '.join(MODES)}, got {_show(mode)}")
    if mode != "fixed" and not limits.probe:
        raise PolicyError(f"{at}: mode {mode!r} needs an antidote with a harm probe (`antidote probe`) on the "
                          "transformers backend; use mode \"fixed\"")  # fmt: skip
    threshold = table.get("threshold", base.threshold)
    if not _is_number(threshold) or not 0 <= threshold <= 1:
        raise PolicyError(f"{at}: threshold is a harm probability in [0, 1], got {_show(threshold)}")
    positions = table.get("positions", base.positions)
    if positions not in POSITIONS:
        raise PolicyError(f"{at}: positions must be one of {', '.join(POSITIONS)}, got {_show(positions)}")
    if positions != "all" and not limits.any_positions:
        raise PolicyError(f'{at}: positions {positions!r} needs the transformers backend; use "all"')
    refuse = table.get("refuse_threshold", NEVER if base.refuse_threshold is None else base.refuse_threshold)
    if refuse != NEVER and (not _is_number(refuse) or not 0 <= refuse <= 1):
        raise PolicyError(f'{at}: refuse_threshold is a harm probability in [0, 1] or "{NEVER}", got {_show(refuse)}')
    if refuse != NEVER and not limits.probe:
        raise PolicyError(f"{at}: refuse_threshold reads the harm probe, which this server's antidote lacks (or the "
                          f'backend cannot read); use "{NEVER}"')  # fmt: skip
    return Setting(float(alpha), mode, float(threshold), positions, None if refuse == NEVER else float(refuse))


def _api_keys(table: dict[str, Any], at: str, by_header: bool) -> list[str]:
    keys = table.get("api_keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and API_KEY.fullmatch(k) for k in keys):
        raise PolicyError(f"{at}.api_keys must be a list of keys of visible ASCII characters (no spaces, at most "
                          "512): a client sends them in an HTTP header")  # fmt: skip
    if keys and by_header:
        raise PolicyError(f"{at}.api_keys: with tenant_header set, tenants are named by the header, not by key; "
                          "remove api_keys (protect the server with --api-key) or remove tenant_header")  # fmt: skip
    if len(set(keys)) != len(keys):
        raise PolicyError(f"{at}.api_keys lists a key twice; list each once")
    return keys


def _only(table: dict[str, Any], allowed: set[str], where: str, what: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise PolicyError(f"{where}: unknown key {_show(unknown[0])} in {what}; allowed: {', '.join(sorted(allowed))}")


def _is_number(value: Any) -> bool:
    """A finite number a float can hold (not a boolean, NaN, infinity or a 400-digit integer)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _show(value: Any) -> str:
    """A value as an error message quotes it: at most 60 characters."""
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _masked(key: str) -> str:
    """A key as it may appear in a log or an error message: its first 4 characters."""
    return repr(key[:4] + "...") if len(key) > 4 else "'...'"


class PolicyStore:
    """The policy in force, swapped whole on reload: a request resolves its tenant and setting once, so a
    reload never changes a request that is already running."""

    def __init__(self, path: Path | None, limits: ServerLimits):
        self.path, self.limits = path, limits
        self.current = load_policy(path, limits) if path is not None else single_tenant(limits)

    def reload(self) -> str | None:
        """Read the file again; None when the new policy is in force, else why the last good one was kept."""
        if self.path is None:
            return "this server was started without --policy; there is no file to reload"
        try:
            self.current = load_policy(self.path, self.limits)
        except PolicyError as exc:
            return str(exc)
        except Exception as exc:  # whatever else a bad file provokes, the server keeps its last good policy
            return f"policy file {str(self.path)!r}: {type(exc).__name__}: {_show(exc)}"
        return None
