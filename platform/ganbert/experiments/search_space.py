"""Ray Tune search spaces from YAML (`search_spaces/*.yaml`), validated against the run Config."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ganbert import config as config_mod
from ganbert.config import Config

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
BUNDLE_KEY = "bundle"
TUNE_KEY = "tune"
TUNE_FIELDS = ("metric", "mode", "num_samples")
MODES = ("max", "min")
MAX_CHECKED_COMBINATIONS = 4096


@dataclass
class SearchSpace:
    """A validated sweep: `param_space` holds Ray Tune domains keyed by dotted config paths.

    `specs` keeps the YAML form (key -> {domain: values} or a fixed value); `bundle` is the list of
    override bundles swept as one grid/choice axis (empty when the file has none).
    """

    param_space: dict[str, Any]
    metric: str = "val_psnr"
    mode: str = "max"
    num_samples: int = 1
    source: str = ""
    specs: dict[str, Any] = field(default_factory=dict)

    @property
    def grid_size(self) -> int:
        """Number of grid points (product of the grid lengths; 1 without a grid)."""
        size = 1
        for spec in self.specs.values():
            if isinstance(spec, dict) and "grid" in spec:
                size *= len(spec["grid"])
        return size

    @property
    def num_trials(self) -> int:
        """Trials Ray Tune runs: grid points x num_samples."""
        return self.grid_size * self.num_samples


def _fail(source: str, key: str, why: str) -> ValueError:
    return ValueError(f"search space {source}: key {key}: {why}")


def _is_domain(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DOMAINS


def _flatten(tree: dict[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """Nested sections -> dotted keys; a one-key mapping {grid|choice|...: ...} is a leaf domain."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if not isinstance(key, str) or not key:
            raise _fail(source, f"{prefix}{key}", "keys must be non-empty strings")
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not _is_domain(value):
            if not value:
                raise _fail(source, name, "empty mapping (expected a domain such as {grid: [...]} or fields)")
            if any(k in DOMAINS for k in value):
                raise _fail(source, name, f"a domain mapping has exactly one key of {DOMAINS}, got {sorted(value)}")
            out.update(_flatten(value, source, name + "."))
        else:
            if name in out:
                raise _fail(source, name, "given twice")
            out[name] = value
    return out


def _check_value(base: Config, source: str, key: str, value: Any) -> Any:
    """The value as the Config field stores it (coerced); ValueError naming the file and key if it does not fit."""
    if isinstance(value, (dict, list)) and not (isinstance(value, list) and all(
            isinstance(v, (int, float, str, bool)) for v in value)):
        raise _fail(source, key, f"value {value!r} is not a plain value")
    try:
        cfg = config_mod.apply(base, {key: value})
    except ValueError as err:
        raise _fail(source, key, f"value {value!r} does not fit the config ({err})") from None
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _plain(value: Any) -> Any:
    """Tuples (config fields like optim.betas) as lists, so Ray Tune treats them as values."""
    return list(value) if isinstance(value, tuple) else value


def _check_bounds(base: Config, source: str, key: str, domain: str, spec: Any) -> tuple[float, float]:
    if not (isinstance(spec, list) and len(spec) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in spec)):
        raise _fail(source, key, f"{domain} needs [low, high] (two finite numbers), got {spec!r}")
    lo, hi = spec
    if not lo < hi:
        raise _fail(source, key, f"{domain} needs low < high, got {spec!r}")
    if domain == "loguniform" and lo <= 0:
        raise _fail(source, key, f"loguniform needs low > 0, got {lo}")
    if domain == "randint":
        if not (float(lo).is_integer() and float(hi).is_integer()):
            raise _fail(source, key, f"randint needs integer bounds, got {spec!r}")
        lo, hi = int(lo), int(hi)
        ends: tuple[Any, Any] = (lo, hi - 1)  # randint's upper bound is exclusive
    else:
        ends = (float(lo), math.nextafter(float(hi), float(lo)))  # sampled in [low, high)
    for end in ends:
        _check_value(base, source, key, end)
    return lo, hi


def _bundle_entries(base: Config, source: str, values: Any) -> list[dict[str, Any]]:
    if not isinstance(values, list) or not values:
        raise _fail(source, BUNDLE_KEY, "needs a non-empty list of override mappings")
    entries: list[dict[str, Any]] = []
    for i, entry in enumerate(values):
        if not isinstance(entry, dict) or not entry:
            raise _fail(source, f"{BUNDLE_KEY}[{i}]", f"must be a non-empty mapping of config keys, got {entry!r}")
        flat = _flatten(entry, source, "")
        checked = {}
        for key, value in flat.items():
            if _is_domain(value):
                raise _fail(source, f"{BUNDLE_KEY}[{i}].{key}", "bundle entries hold fixed values, not domains")
            checked[key] = _plain(_check_value(base, source, key, value))
        entries.append(checked)
    return entries


def _domain(base: Config, source: str, key: str, spec: Any) -> tuple[Any, Any]:
    """(Ray Tune object, normalised YAML spec) for one key."""
    from ray import tune

    if not _is_domain(spec):
        fixed = _plain(_check_value(base, source, key, spec))
        return fixed, fixed
    domain, values = next(iter(spec.items()))
    if domain in ("grid", "choice"):
        if key == BUNDLE_KEY:
            items: list[Any] = _bundle_entries(base, source, values)
        else:
            if not isinstance(values, list) or not values:
                raise _fail(source, key, f"{domain} needs a non-empty list of values, got {values!r}")
            items = [_plain(_check_value(base, source, key, v)) for v in values]
        if len({yaml.safe_dump(v) for v in items}) != len(items):
            raise _fail(source, key, f"{domain} lists a value twice: {values!r}")
        made = tune.grid_search(items) if domain == "grid" else tune.choice(items)
        return made, {domain: items}
    if key == BUNDLE_KEY:
        raise _fail(source, key, f"a bundle is swept with grid or choice, not {domain}")
    lo, hi = _check_bounds(base, source, key, domain, values)
    maker = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[domain]
    return maker(lo, hi), {domain: [lo, hi]}


def _tune_block(source: str, block: Any) -> dict[str, Any]:
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise _fail(source, TUNE_KEY, f"must be a mapping of {TUNE_FIELDS}")
    unknown = sorted(set(block) - set(TUNE_FIELDS))
    if unknown:
        raise _fail(source, f"{TUNE_KEY}.{unknown[0]}", f"unknown (allowed: {', '.join(TUNE_FIELDS)})")
    out: dict[str, Any] = {}
    if "metric" in block:
        if not isinstance(block["metric"], str) or not block["metric"]:
            raise _fail(source, "tune.metric", f"must be a metric name, got {block['metric']!r}")
        out["metric"] = block["metric"]
    if "mode" in block:
        if block["mode"] not in MODES:
            raise _fail(source, "tune.mode", f"must be one of {MODES}, got {block['mode']!r}")
        out["mode"] = block["mode"]
    if "num_samples" in block:
        n = block["num_samples"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise _fail(source, "tune.num_samples", f"must be an integer >= 1, got {n!r}")
        out["num_samples"] = n
    return out


def _check_combinations(base: Config, source: str, specs: dict[str, Any]) -> None:
    """Apply every combination of the grid/choice/fixed values to the base config (when not too many)."""
    axes: list[list[dict[str, Any]]] = []
    for key, spec in specs.items():
        if isinstance(spec, dict) and ("grid" in spec or "choice" in spec):
            values = next(iter(spec.values()))
            axes.append([v if key == BUNDLE_KEY else {key: v} for v in values])
        elif isinstance(spec, dict):
            continue  # continuous domains: their ends were checked one key at a time
        else:
            axes.append([{key: spec}])
    if math.prod(len(a) for a in axes) > MAX_CHECKED_COMBINATIONS:
        return
    for combo in itertools.product(*axes):
        overrides: dict[str, Any] = {}
        for part in combo:
            overrides.update(part)
        try:
            config_mod.apply(base, overrides)
        except ValueError as err:
            raise ValueError(f"search space {source}: combination {overrides} does not fit the config "
                             f"({err})") from None


def load_space(path: str | Path, base: Config | None = None) -> SearchSpace:
    """Read and validate a search-space YAML file against `base` (default: the tiny preset).

    Format: config keys (`section.field`, or nested `section: {field: ...}`) mapped to a fixed value or
    one of {grid: [..]}, {choice: [..]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]};
    `bundle: {grid: [{key: value, ...}, ...]}` sweeps sets of overrides together; optional
    `tune: {metric, mode, num_samples}`. Raises ValueError naming the file and the key.
    """
    path = Path(path)
    source = str(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"search space {source}: cannot read ({err})") from None
    if not isinstance(tree, dict) or not tree:
        raise ValueError(f"search space {source}: expected a mapping of config keys to domains")
    base = base if base is not None else config_mod.tiny()
    settings = _tune_block(source, tree.pop(TUNE_KEY, None))
    bundle = tree.pop(BUNDLE_KEY, None)
    flat = _flatten(tree, source)
    for key in flat:
        if key.count(".") != 1:
            raise _fail(source, key, "unknown config key (expected section.field, e.g. optim.lr)")
    param_space: dict[str, Any] = {}
    specs: dict[str, Any] = {}
    for key, spec in flat.items():
        param_space[key], specs[key] = _domain(base, source, key, spec)
    if bundle is not None:
        if not _is_domain(bundle):
            raise _fail(source, BUNDLE_KEY, "must be {grid: [...]} or {choice: [...]} of override mappings")
        param_space[BUNDLE_KEY], specs[BUNDLE_KEY] = _domain(base, source, BUNDLE_KEY, bundle)
        clash = sorted({k for entry in specs[BUNDLE_KEY][next(iter(specs[BUNDLE_KEY]))] for k in entry} & set(flat))
        if clash:
            raise _fail(source, clash[0], "set both by the bundle and on its own")
    _check_combinations(base, source, specs)
    return SearchSpace(param_space=param_space, source=source, specs=specs, **settings)


def trial_overrides(trial_config: dict[str, Any]) -> dict[str, Any]:
    """The dotted config overrides of one Tune trial (its config dict; the bundle is merged in)."""
    if not isinstance(trial_config, dict):
        raise ValueError(f"trial_config must be a dict, got {type(trial_config).__name__}")
    out: dict[str, Any] = {}
    for key, value in config_mod.flatten({k: v for k, v in trial_config.items() if k != BUNDLE_KEY}).items():
        out[key] = value
    bundle = trial_config.get(BUNDLE_KEY)
    if bundle is not None:
        if not isinstance(bundle, dict):
            raise ValueError(f"trial_config[{BUNDLE_KEY!r}] must be a mapping of overrides, got {bundle!r}")
        for key, value in config_mod.flatten(bundle).items():
            if key in out and out[key] != value:
                raise ValueError(f"trial_config: {key} is set both by the bundle and on its own")
            out[key] = value
    for key in out:
        if key.count(".") != 1:
            raise ValueError(f"trial_config: key {key} is not a section.field config key")
    return out
