"""Typed run configuration: dataclasses, presets tiny()/demo()/paper(), YAML and key=value overrides."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, get_args, get_origin, get_type_hints

import yaml

Shape3 = tuple[int, int, int]

SCHEMES = ("paper", "monotonic")
TRACERS = ("AV45", "AV1451", "FDG")


@dataclass(frozen=True)
class Method:
    """A method of the paper's Table 1: the generator head and which discriminators judge it."""

    head: str
    bert: bool
    cnn: bool


METHODS: dict[str, Method] = {
    "pix2pix-tanh": Method(head="tanh", bert=False, cnn=True),
    "pix2pix-tanhshrink": Method(head="tanhshrink", bert=False, cnn=True),
    "ganbert": Method(head="tanhshrink", bert=True, cnn=False),
    "ganbert-cnnd": Method(head="tanhshrink", bert=True, cnn=True),
}


def grid_for(n: int) -> Shape3:
    """The 3D grid (a <= b <= c, a*b*c = n) closest to a cube: 512 -> (8, 8, 8), 256 -> (4, 8, 8)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    best: Shape3 | None = None
    for a in range(1, n + 1):
        if n % a:
            continue
        for b in range(a, n // a + 1):
            if (n // a) % b:
                continue
            c = n // (a * b)
            if c < b:
                continue
            if best is None or c / a < best[2] / best[0]:
                best = (a, b, c)
    assert best is not None
    return best


@dataclass
class GeometryConfig:
    """Volume shapes the networks see: MRI (1, *mri_size), PET (pet_frames, *pet_size)."""

    mri_size: Shape3 = (256, 256, 256)
    pet_frames: int = 2
    pet_size: Shape3 = (93, 76, 76)
    tracer: str = "AV45"
    mri_fov_mm: float = 256.0
    # RAS x, y, z extent of the PET grid: the paper's 93 x 76 x 76 voxels at 2.0 x 2.5 x 2.0 mm, which
    # covers a whole brain (about 140 x 175 x 130 mm) with margin.
    pet_fov_mm: tuple[float, float, float] = (186.0, 190.0, 152.0)

    @property
    def mri_voxel_mm(self) -> float:
        """Isotropic MRI voxel size: 256 mm / 256 = 1 mm at paper geometry."""
        return self.mri_fov_mm / self.mri_size[0]

    @property
    def pet_voxel_mm(self) -> tuple[float, float, float]:
        """PET voxel size per axis: FOV / grid (2.0 x 2.5 x 2.0 mm at paper geometry)."""
        return tuple(f / n for f, n in zip(self.pet_fov_mm, self.pet_size))  # type: ignore[return-value]


@dataclass
class SequenceConfig:
    """Summarising images into L values, quantising them to token ids, and MLM masking."""

    length: int = 512
    # `monotonic` (default, ours): each segment's calibrated range [lo, hi] maps linearly onto the value ids,
    # clipped, collision-free. `paper`: q = round(scale * v) with the paper's wrap-around ids (the ablation).
    scheme: str = "monotonic"
    scale: float = 1000.0  # paper scheme only
    vocab_values: int = 10_000
    wrap: int = 500  # paper scheme only
    # Summary-value ranges of the training data (manifest token statistics); (0, 0) = calibrate at train start.
    mri_range: tuple[float, float] = (0.0, 0.0)
    pet_range: tuple[float, float] = (0.0, 0.0)
    mri_mask_ratio: float = 0.05
    pet_mask_ratio: float = 0.25

    @property
    def tokens(self) -> int:
        """Sequence length in tokens: [CLS] mri [SEP] pet [SEP]."""
        return 2 * self.length + 3


@dataclass
class ModelConfig:
    """Method (sets the head and discriminators, see METHODS) and network sizes."""

    method: str = "ganbert"
    base_channels: int = 16
    max_channels: int = 256
    bert_hidden: int = 768
    bert_layers: int = 12
    bert_heads: int = 12
    bert_intermediate: int = 3072
    bert_max_positions: int = 1032
    cnn_channels: int = 32
    cnn_layers: int = 3
    init_output_mean: bool = True  # start the generator at the training PET's mean and spread (unet3d)


@dataclass
class OptimConfig:
    """Objective weights and optimisation."""

    lambda_nsp: float = 20.0
    lambda_mlm: float = 1.0
    lambda_l1: float = 20.0
    lambda_cnn: float = 1.0
    lr: float = 1e-4
    d_lr_scale: float = 1.0  # discriminators' (BERT, CNN-D) lr = lr * d_lr_scale
    betas: tuple[float, float] = (0.5, 0.999)
    warmup_fraction: float = 0.05
    gan_warmup_fraction: float = 0.0  # adversarial weights (NSP, MLM, CNN) ramp linearly from 0 over this share
    batch_size: int = 2
    accumulation: int = 2
    epochs: int = 500
    amp: bool = True
    checkpointing: bool = True
    channels_last: bool = True
    compile: bool = False


@dataclass
class RunConfig:
    """Where and how a run executes (edges only: Ray, MLflow, storage)."""

    name: str = "ganbert"
    seed: int = 0
    workers: int = 1
    cpus_per_worker: int = 1
    threads_per_worker: int = 0  # torch intra-op threads per worker; 0 = the CPUs Ray gives it
    use_gpu: bool = False
    storage: str = "runs/ray"
    experiment: str = "ganbert"
    max_failures: int = 2
    log_every: int = 10
    validate_every: int = 1  # validate on val every N epochs; the last epoch always
    checkpoint_every: int = 1  # checkpoint every N epochs (a multiple of validate_every), the last and each new best
    in_memory_mb: int = 1024  # a training split up to this size (decoded) is read once per worker, else every epoch


@dataclass
class Config:
    """A whole run: every field can be set from YAML or `section.field=value`."""

    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = "paper"

    def __post_init__(self) -> None:
        validate(self)

    # --- derived geometry -------------------------------------------------------------------
    @property
    def mri_grid(self) -> Shape3:
        """Summary grid of the MRI, also the U-Net bottleneck grid: 512 -> (8, 8, 8)."""
        n = round(self.sequence.length ** (1 / 3))
        return (n, n, n)

    @property
    def pet_grid(self) -> Shape3:
        """Summary grid of one PET frame: 512 / T values, e.g. T=2 -> (4, 8, 8)."""
        return grid_for(self.sequence.length // self.geometry.pet_frames)

    @property
    def token_space_fixed(self) -> bool:
        """Whether the token space is fixed: the paper scheme, or monotonic with both ranges set."""
        s = self.sequence
        return s.scheme == "paper" or ((0.0, 0.0) not in (tuple(s.mri_range), tuple(s.pet_range)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Flattened `section.field -> value` (for MLflow params)."""
        out: dict[str, Any] = {"preset": self.preset}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                for key, value in values.items():
                    out[f"{section}.{key}"] = value
        return out


def _check(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ValueError(f"config field {name}: {why}")


def validate(cfg: Config) -> None:
    """Raise ValueError naming the field for any inconsistent value."""
    g, s, m, o, r = cfg.geometry, cfg.sequence, cfg.model, cfg.optim, cfg.run
    for name, size in (("geometry.mri_size", g.mri_size), ("geometry.pet_size", g.pet_size)):
        _check(len(size) == 3 and all(int(v) >= 1 for v in size), name, f"must be 3 positive ints, got {size}")
    _check(g.mri_size[0] == g.mri_size[1] == g.mri_size[2], "geometry.mri_size", f"must be a cube, got {g.mri_size}")
    _check(g.pet_frames >= 1, "geometry.pet_frames", f"must be >= 1, got {g.pet_frames}")
    _check(g.mri_fov_mm > 0, "geometry.mri_fov_mm", f"must be > 0, got {g.mri_fov_mm}")
    _check(len(g.pet_fov_mm) == 3 and all(f > 0 for f in g.pet_fov_mm), "geometry.pet_fov_mm",
           f"must be 3 positive numbers, got {g.pet_fov_mm}")
    _check(g.tracer in TRACERS, "geometry.tracer", f"must be one of {TRACERS}, got {g.tracer!r}")
    _check(s.length >= 8, "sequence.length", f"must be >= 8, got {s.length}")
    n = round(s.length ** (1 / 3))
    _check(n**3 == s.length, "sequence.length", f"must be a cube (MRI summary grid n^3), got {s.length}")
    _check(s.length % g.pet_frames == 0, "geometry.pet_frames",
           f"{g.pet_frames} frames do not divide sequence.length={s.length}")
    side = g.mri_size[0]
    _check(side % n == 0 and (side // n) & (side // n - 1) == 0 and side // n >= 2, "geometry.mri_size",
           f"MRI side {side} must be the summary grid {n} times a power of two (>= 2)")
    if s.length % g.pet_frames == 0:
        pg = grid_for(s.length // g.pet_frames)
        _check(all(a >= b for a, b in zip(sorted(g.pet_size), sorted(pg))), "geometry.pet_size",
               f"PET grid {g.pet_size} is smaller than its summary grid {pg}")
    _check(s.scale > 0, "sequence.scale", f"must be > 0, got {s.scale}")
    _check(s.scheme in SCHEMES, "sequence.scheme", f"must be one of {SCHEMES}, got {s.scheme!r}")
    _check(s.vocab_values > 2 * s.wrap > 0, "sequence.vocab_values", "must exceed 2 * sequence.wrap > 0")
    for name, (lo, hi) in (("sequence.mri_range", s.mri_range), ("sequence.pet_range", s.pet_range)):
        _check((lo, hi) == (0.0, 0.0) or (math.isfinite(lo) and math.isfinite(hi) and hi > lo), name,
               f"must be (low, high) with high > low, or (0, 0) to calibrate from the data; got {(lo, hi)}")
    for name, ratio in (("sequence.mri_mask_ratio", s.mri_mask_ratio), ("sequence.pet_mask_ratio", s.pet_mask_ratio)):
        _check(0.0 <= ratio < 1.0, name, f"must be in [0, 1), got {ratio}")
    _check(m.method in METHODS, "model.method", f"must be one of {tuple(METHODS)}, got {m.method!r}")
    for name in ("base_channels", "max_channels", "bert_hidden", "bert_layers", "bert_heads",
                 "bert_intermediate", "cnn_channels", "cnn_layers"):
        _check(getattr(m, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(m, name)}")
    _check(m.bert_hidden % m.bert_heads == 0, "model.bert_heads", f"must divide bert_hidden={m.bert_hidden}")
    _check(s.tokens <= m.bert_max_positions, "model.bert_max_positions",
           f"sequence of {s.tokens} tokens is longer than {m.bert_max_positions} positions")
    for name in ("lambda_nsp", "lambda_mlm", "lambda_l1", "lambda_cnn", "lr"):
        _check(getattr(o, name) >= 0, f"optim.{name}", f"must be >= 0, got {getattr(o, name)}")
    _check(0.0 <= o.warmup_fraction < 1.0, "optim.warmup_fraction", f"must be in [0, 1), got {o.warmup_fraction}")
    _check(0.0 <= o.gan_warmup_fraction <= 1.0, "optim.gan_warmup_fraction",
           f"must be in [0, 1], got {o.gan_warmup_fraction}")
    _check(o.d_lr_scale > 0, "optim.d_lr_scale", f"must be > 0, got {o.d_lr_scale}")
    for name in ("batch_size", "accumulation", "epochs"):
        _check(getattr(o, name) >= 1, f"optim.{name}", f"must be >= 1, got {getattr(o, name)}")
    _check(all(0 <= b < 1 for b in o.betas), "optim.betas", f"must be in [0, 1), got {o.betas}")
    _check(r.workers >= 1, "run.workers", f"must be >= 1, got {r.workers}")
    _check(r.cpus_per_worker >= 1, "run.cpus_per_worker", f"must be >= 1, got {r.cpus_per_worker}")
    _check(r.threads_per_worker >= 0, "run.threads_per_worker", f"must be >= 0, got {r.threads_per_worker}")
    _check(r.max_failures >= 0, "run.max_failures", f"must be >= 0, got {r.max_failures}")
    for name in ("validate_every", "checkpoint_every"):
        _check(getattr(r, name) >= 1, f"run.{name}", f"must be >= 1, got {getattr(r, name)}")
    _check(r.checkpoint_every % r.validate_every == 0, "run.checkpoint_every",
           f"must be a multiple of run.validate_every={r.validate_every} (a checkpoint carries its val score), "
           f"got {r.checkpoint_every}")
    _check(r.in_memory_mb >= 0, "run.in_memory_mb", f"must be >= 0 (0: always stream), got {r.in_memory_mb}")


# --- presets -------------------------------------------------------------------------------------

def paper() -> Config:
    """The paper: 256^3 MRI, 2x93x76x76 PET, L=512, BERT-base. For GPUs."""
    return Config(preset="paper")


def demo() -> Config:
    """Minutes on a 2-core CPU: 64^3 MRI, L=512 (1027 tokens), a 2-layer BERT."""
    return Config(
        geometry=GeometryConfig(mri_size=(64, 64, 64), pet_size=(24, 20, 20)),
        model=ModelConfig(base_channels=8, max_channels=64, bert_hidden=128, bert_layers=2, bert_heads=4,
                          bert_intermediate=256, cnn_channels=16, cnn_layers=2),
        optim=OptimConfig(batch_size=2, accumulation=1, epochs=6, amp=False, checkpointing=False,
                          lr=5e-4, channels_last=False),
        # One Ray CPU for the worker leaves one for Ray Data's readers; torch still uses both cores.
        run=RunConfig(name="demo", workers=1, cpus_per_worker=1, threads_per_worker=2, log_every=5),
        preset="demo",
    )


def tiny() -> Config:
    """Seconds on a CPU (tests): 32^3 MRI, 2x14x12x12 PET, L=64 (131 tokens), a 2-layer BERT."""
    return Config(
        geometry=GeometryConfig(mri_size=(32, 32, 32), pet_size=(14, 12, 12)),
        sequence=SequenceConfig(length=64),
        model=ModelConfig(base_channels=4, max_channels=16, bert_hidden=32, bert_layers=2, bert_heads=2,
                          bert_intermediate=64, bert_max_positions=160, cnn_channels=8, cnn_layers=2),
        # A 2-layer, 32-wide BERT separates a fixed batch at once; at the paper's lambda_nsp=20 its NSP
        # gradient then stalls L1 for hundreds of steps, so tests weight L1 like pix2pix (100) and NSP at 1.
        optim=OptimConfig(batch_size=2, accumulation=1, epochs=2, amp=False, checkpointing=False,
                          lr=3e-3, lambda_nsp=1.0, lambda_l1=100.0, channels_last=False),
        run=RunConfig(name="tiny", workers=1, cpus_per_worker=1, log_every=1),
        preset="tiny",
    )


PRESETS: dict[str, Callable[[], Config]] = {"tiny": tiny, "demo": demo, "paper": paper}


# --- overrides -----------------------------------------------------------------------------------

def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the dataclass field's type, or raise ValueError naming the field."""
    origin = get_origin(hint)
    try:
        if origin is tuple:
            items = value
            if isinstance(value, str):
                items = [v for v in value.strip("()[] ").split(",") if v.strip()]
            args = get_args(hint)
            if len(items) != len(args):
                raise ValueError(f"expected {len(args)} values, got {len(items)}")
            return tuple(_coerce(v, a, name) for v, a in zip(items, args))
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"not an integer: {value!r}")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config field {name}: {err}") from None
    raise ValueError(f"config field {name}: unsupported type {hint}")


def apply(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a new validated Config with `section.field -> value` overrides applied."""
    data = cfg.to_dict()
    hints = get_type_hints(Config)
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in data or not isinstance(data[parts[0]], dict):
            raise ValueError(f"config field {key}: unknown (expected section.field, e.g. optim.lr)")
        section, name = parts
        section_hints = get_type_hints(hints[section])
        if name not in section_hints:
            raise ValueError(f"config field {key}: unknown field of section {section!r}")
        data[section][name] = _coerce(value, section_hints[name], key)
    return from_dict(data)


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from a nested dict (as to_dict() writes), validating it."""
    hints = get_type_hints(Config)
    kwargs: dict[str, Any] = {}
    for section, value in data.items():
        if section not in hints:
            raise ValueError(f"config field {section}: unknown section")
        if section == "preset":
            kwargs[section] = str(value)
            continue
        cls = hints[section]
        fields = get_type_hints(cls)
        unknown = set(value) - set(fields)
        if unknown:
            raise ValueError(f"config field {section}.{sorted(unknown)[0]}: unknown field")
        kwargs[section] = cls(**{k: _coerce(v, fields[k], f"{section}.{k}") for k, v in value.items()})
    return Config(**kwargs)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> `a.b -> value`."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`["optim.lr=1e-4", ...]` -> {"optim.lr": "1e-4"}; raises ValueError on a malformed item."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r}: expected key.path=value")
        out[key.strip()] = value.strip()
    return out


def load(preset: str = "paper", config_file: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Preset, then YAML file, then `key=value` overrides (later wins)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    cfg = PRESETS[preset]()
    if config_file is not None:
        path = Path(config_file)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"config file {path}: {err}") from None
        if not isinstance(tree, dict):
            raise ValueError(f"config file {path}: expected a mapping of sections")
        tree.pop("preset", None)
        cfg = apply(cfg, flatten(tree))
    if overrides:
        cfg = apply(cfg, parse_overrides(overrides))
    return cfg


def save(cfg: Config, path: str | Path) -> None:
    """Write the config as YAML (atomic)."""
    from ganbert.common.atomic import write_text

    write_text(path, yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def load_file(path: str | Path) -> Config:
    """A whole config as `save` wrote it (every section), validated."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"config file {path}: {err}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"config file {path}: expected a mapping of sections")
    return from_dict(tree)
