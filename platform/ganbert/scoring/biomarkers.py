"""Biomarker-level read-outs of real vs generated PET: published conversions per subject, agreement over subjects.

Pure numpy (no torch, Ray or MLflow). Per subject: Centiloid (AV45), Braak stage (AV1451). Over subjects:
Pearson r, ICC(2,1), Bland-Altman bias and limits, Cohen's kappa, sensitivity / specificity, weighted kappa.
A statistic that is not defined for the data raises `Undefined` with the reason; callers report it as absent
(null, with that reason), never as 0.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

# Centiloid of a florbetapir (AV45) cortical SUVR over the whole cerebellum, ADNI's UC Berkeley pipeline:
# CL = 188.22 x SUVR - 189.16 (Royse et al. 2021, Alzheimer's Research & Therapy 13:99, "Validation of amyloid
# PET positivity thresholds in centiloids: a multisite PET study approach", doi:10.1186/s13195-021-00836-1).
# Chosen over the Avid pipeline's CL = 183.07 x SUVR - 177.26 (Navitsky et al. 2018, Alzheimer's & Dementia
# 14:1565, doi:10.1016/j.jalz.2018.06.1353) because ADNI's SUVRs and the 1.11 positivity cut-off (Landau et al.
# 2013) come from the Berkeley pipeline: Royse et al. give that cut-off as 20 CL (188.22 x 1.11 - 189.16 = 19.76).
CENTILOID_FBP_WHOLE_CEREBELLUM = (188.22, -189.16)

# In vivo Braak staging of flortaucipir (AV1451) SUVRs (Maass et al. 2017, NeuroImage 157:448, "Comparison of
# multiple tau-PET measures as biomarkers in aging and Alzheimer's disease", Fig. 1): Braak ROIs read from late
# to early, a subject is at the latest stage whose ROI exceeds its threshold: V/VI > 1.87, III/IV > 1.30,
# I/II > 1.13, else stage 0. Their thresholds are for partial-volume-corrected SUVRs (inferior cerebellar grey
# reference); on SUVRs without PVC they read conservatively (lower stages), for the real and generated PET alike.
# Stages are coded 0 = none, 1 = I-II, 2 = III-IV, 3 = V-VI.
BRAAK_THRESHOLDS = ((3, 1.87), (2, 1.30), (1, 1.13))
BRAAK_CODES = (0, 1, 2, 3)

# Bland & Altman 1986 (Lancet 327:307): 95 % limits of agreement = bias +- 1.96 SD of the differences.
LOA_Z = 1.96
# Fewest subjects for a correlation, ICC or limits of agreement (below that they are reported absent).
MIN_SUBJECTS = 3


class Undefined(ValueError):
    """A statistic that the data do not define (too few subjects, no positives, a constant rater); args[0] says why."""


def centiloid(suvr: float) -> float:
    """Centiloid of an AV45 whole-cerebellum composite SUVR (CENTILOID_FBP_WHOLE_CEREBELLUM); NaN stays NaN."""
    slope, intercept = CENTILOID_FBP_WHOLE_CEREBELLUM
    return slope * float(suvr) + intercept


def braak_stage(i_ii: float, iii_iv: float, v_vi: float) -> float:
    """Braak stage code (0-3, BRAAK_THRESHOLDS) from the SUVRs of the I-II, III-IV and V-VI ROIs; NaN if any is NaN."""
    suvr = {1: float(i_ii), 2: float(iii_iv), 3: float(v_vi)}
    if not all(math.isfinite(v) for v in suvr.values()):
        return float("nan")
    for stage, cut in BRAAK_THRESHOLDS:
        if suvr[stage] > cut:
            return float(stage)
    return 0.0


# --- agreement of two measurements over subjects --------------------------------------------------

def paired(real: Sequence[float], fake: Sequence[float], minimum: int = MIN_SUBJECTS) -> tuple[np.ndarray, np.ndarray]:
    """(real, fake) float64 arrays of the subjects where both are finite; Undefined if fewer than `minimum`."""
    a, b = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"real and fake must be 1-D of one length, got shapes {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    if int(keep.sum()) < minimum:
        raise Undefined(f"needs at least {minimum} subjects with both values, got {int(keep.sum())}")
    return a[keep], b[keep]


def pearson_r(real: Sequence[float], fake: Sequence[float]) -> float:
    """Pearson correlation of paired values (n >= MIN_SUBJECTS); Undefined when either side is constant."""
    a, b = paired(real, fake)
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(da @ da) * float(db @ db))
    if denom == 0.0:
        raise Undefined("a constant measurement has no correlation")
    return float(da @ db) / denom


def icc_2_1(ratings: np.ndarray) -> float:
    """ICC(2,1) of an (n targets, k judges) table: two-way random effects, absolute agreement, single measure.

    Shrout & Fleiss 1979 (Psychological Bulletin 86:420), Table 1:
    (BMS - EMS) / (BMS + (k - 1) EMS + k (JMS - EMS) / n), with BMS, JMS, EMS the between-targets,
    between-judges and residual mean squares of the two-way ANOVA. Undefined for n < MIN_SUBJECTS, k < 2,
    or when every rating is equal.
    """
    x = np.asarray(ratings, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"ratings must have shape (n targets, k >= 2 judges), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("ratings must be finite")
    n, k = x.shape
    if n < MIN_SUBJECTS:
        raise Undefined(f"needs at least {MIN_SUBJECTS} subjects, got {n}")
    grand = x.mean()
    ss_rows = k * float(((x.mean(axis=1) - grand) ** 2).sum())
    ss_cols = n * float(((x.mean(axis=0) - grand) ** 2).sum())
    ss_err = float(((x - grand) ** 2).sum()) - ss_rows - ss_cols
    bms, jms, ems = ss_rows / (n - 1), ss_cols / (k - 1), ss_err / ((n - 1) * (k - 1))
    denom = bms + (k - 1) * ems + k * (jms - ems) / n
    if denom <= 0.0:
        raise Undefined("no variance between subjects or judges")
    return (bms - ems) / denom


def bland_altman(real: Sequence[float], fake: Sequence[float]) -> tuple[float, float, float]:
    """(bias, lower, upper): mean of fake - real and bias -+ LOA_Z x its sample SD (Bland & Altman 1986)."""
    a, b = paired(real, fake)
    d = b - a
    bias, sd = float(d.mean()), float(d.std(ddof=1))
    return bias, bias - LOA_Z * sd, bias + LOA_Z * sd


def agreement(real: Sequence[float], fake: Sequence[float]) -> dict[str, float | str]:
    """{pearson_r, icc21, ba_bias, ba_loa_low, ba_loa_high}: each a float, or the reason (str) it is undefined."""
    out: dict[str, float | str] = {}
    for key, fn in (("pearson_r", lambda: pearson_r(real, fake)),
                    ("icc21", lambda: icc_2_1(np.stack(paired(real, fake), axis=1)))):
        try:
            out[key] = fn()
        except Undefined as why:
            out[key] = str(why)
    try:
        out["ba_bias"], out["ba_loa_low"], out["ba_loa_high"] = bland_altman(real, fake)
    except Undefined as why:
        out["ba_bias"] = out["ba_loa_low"] = out["ba_loa_high"] = str(why)
    return out


# --- agreement of two reads (categories) ----------------------------------------------------------

def _codes(real: Sequence[float], fake: Sequence[float], categories: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Paired category indices (0..K-1) of the subjects where both reads exist (Undefined if fewer than
    MIN_SUBJECTS); ValueError on an unknown category."""
    a, b = paired(real, fake)
    cats = np.asarray(categories, dtype=np.float64)
    idx = []
    for name, v in (("real", a), ("fake", b)):
        hit = v[:, None] == cats[None, :]
        if not hit.any(axis=1).all():
            raise ValueError(f"{name} holds values outside the categories {list(categories)}")
        idx.append(hit.argmax(axis=1))
    return idx[0], idx[1]


def kappa(real: Sequence[float], fake: Sequence[float], categories: Sequence[int], weights: str = "none") -> float:
    """Cohen's kappa of two reads over subjects; weighted for ordered categories.

    kappa = 1 - sum(w * observed) / sum(w * expected) over the K x K table of proportions, expected = product of
    the marginals, w_ij the disagreement weight: "none" 1 for i != j (Cohen 1960, Educational and Psychological
    Measurement 20:37; equals (po - pe) / (1 - pe)), "linear" |i - j|, "quadratic" (i - j)^2 (weighted kappa,
    Cohen 1968, Psychological Bulletin 70:213). Undefined for fewer than MIN_SUBJECTS subjects with both reads and
    when both reads are constant (equal: chance agreement 1, 0/0; opposite: 0 by construction, not a finding).
    """
    a, b = _codes(real, fake, categories)
    if np.unique(a).size == 1 and np.unique(b).size == 1:
        raise Undefined("both reads are constant: kappa is undefined")
    k = len(categories)
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    w = {"none": (i != j).astype(np.float64), "linear": np.abs(i - j).astype(np.float64),
         "quadratic": ((i - j) ** 2).astype(np.float64)}.get(weights)
    if w is None:
        raise ValueError(f"weights must be 'none', 'linear' or 'quadratic', got {weights!r}")
    observed = np.zeros((k, k))
    np.add.at(observed, (a, b), 1.0)
    observed /= observed.sum()
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))  # > 0 off the diagonal: a read varies
    return 1.0 - float((w * observed).sum()) / float((w * expected).sum())


def _agreement_on(real: Sequence[float], fake: Sequence[float], read: float, name: str) -> float:
    """Share of the subjects the real PET reads as `read` that the generated PET reads the same; Undefined with
    none (`name` says which read, e.g. positive)."""
    a, b = paired(real, fake, minimum=1)
    chosen = a == read
    if not chosen.any():
        raise Undefined(f"no subject is {name} on the real PET")
    return float((b[chosen] == read).mean())


def sensitivity(real: Sequence[float], fake: Sequence[float]) -> float:
    """TP / (TP + FN) of the generated read (1 = positive) against the real read; Undefined with no real positive."""
    return _agreement_on(real, fake, 1.0, "positive")


def specificity(real: Sequence[float], fake: Sequence[float]) -> float:
    """TN / (TN + FP) of the generated read (0 = negative) against the real read; Undefined with no real negative."""
    return _agreement_on(real, fake, 0.0, "negative")


# --- the cohort summary of an evaluation ----------------------------------------------------------
# Per-subject columns read here (written by evaluate.region_metrics): suvr_real.<region> / suvr_fake.<region>,
# positive_real / positive_fake, centiloid_*, metaroi_*, braak_*. Summary keys: BIOMARKER_KEYS; NOTES_KEY maps a key
# or a key prefix ("centiloid", "suvr.pons") to why it is absent.

AGREEMENT_STATS = ("pearson_r", "icc21", "ba_bias", "ba_loa_low", "ba_loa_high")
TRACER_OF = {"centiloid": "AV45", "braak": "AV1451", "metaroi": "FDG"}
NOTES_KEY = "biomarker_notes"
GROUPS = ("suvr", "positivity", *TRACER_OF)


def summary_keys(regions: Sequence[str]) -> tuple[str, ...]:
    """Every cohort key `summary` returns (besides NOTES_KEY), in a fixed order."""
    return (tuple(f"suvr.{region}.{stat}" for region in regions for stat in AGREEMENT_STATS)
            + tuple(f"{group}.{stat}" for group in ("centiloid", "metaroi") for stat in AGREEMENT_STATS)
            + ("positivity.kappa", "positivity.sensitivity", "positivity.specificity",
               "braak.weighted_kappa_quadratic"))


def _column(subjects: Sequence[dict[str, Any]], key: str) -> list[float]:
    """One per-subject column as floats, NaN where missing or null."""
    return [float("nan") if s.get(key) is None else float(s[key]) for s in subjects]


def summary(subjects: Sequence[dict[str, Any]], tracer: str | None, regions: Sequence[str],
            reference: Sequence[str]) -> dict[str, Any]:
    """Agreement of the generated with the real PET's biomarkers over the labelled `subjects` (per-subject dicts).

    Returns every `summary_keys(regions)` entry (float, or None when absent) and NOTES_KEY {key or prefix: why}:
    suvr.<region>.*, centiloid.*, metaroi.*: `agreement` of real vs generated values; positivity.*: Cohen's kappa,
    sensitivity, specificity of the generated read against the real one; braak.weighted_kappa_quadratic.
    """
    values: dict[str, Any] = dict.fromkeys(summary_keys(regions))
    if tracer not in TRACER_OF.values():
        return {**values, NOTES_KEY: dict.fromkeys(GROUPS, f"tracer {tracer!r} unknown or mixed: no biomarker read")}
    if not subjects:
        why = "no region labels in the shards (has_labels false, e.g. ADNI data): no regional SUVR to read"
        return {**values, NOTES_KEY: dict.fromkeys(GROUPS, why)}
    notes: dict[str, str] = {}

    def put(key: str, fn: Callable[[], float]) -> None:
        try:
            values[key] = float(fn())
        except Undefined as why:
            notes[key] = str(why)

    def agree(prefix: str, real_key: str, fake_key: str) -> None:
        stats = agreement(_column(subjects, real_key), _column(subjects, fake_key))
        reasons = {v for v in stats.values() if isinstance(v, str)}
        if len(reasons) == 1 and all(isinstance(v, str) for v in stats.values()):
            notes[prefix] = reasons.pop()  # one reason for the whole group
            return
        for stat, value in stats.items():
            if isinstance(value, str):
                notes[f"{prefix}.{stat}"] = value
            else:
                values[f"{prefix}.{stat}"] = value

    for region in regions:
        if region in reference:
            notes[f"suvr.{region}"] = f"reference region of {tracer}"
        else:
            agree(f"suvr.{region}", f"suvr_real.{region}", f"suvr_fake.{region}")
    for group, only in TRACER_OF.items():
        if tracer != only:
            notes[group] = f"{only} only; this split is {tracer}"
    real, fake = _column(subjects, "positive_real"), _column(subjects, "positive_fake")
    put("positivity.kappa", lambda: kappa(real, fake, (0, 1)))
    put("positivity.sensitivity", lambda: sensitivity(real, fake))
    put("positivity.specificity", lambda: specificity(real, fake))
    if tracer == "AV45":
        agree("centiloid", "centiloid_real", "centiloid_fake")
    elif tracer == "FDG":
        agree("metaroi", "metaroi_real", "metaroi_fake")
    else:
        put("braak.weighted_kappa_quadratic", lambda: kappa(
            _column(subjects, "braak_real"), _column(subjects, "braak_fake"), BRAAK_CODES, "quadratic"))
    return {**values, NOTES_KEY: notes}


def note_for(summary_: dict[str, Any], key: str) -> str | None:
    """Why a biomarker key of a summary is absent: the note of the key or of its longest dotted prefix."""
    notes = summary_.get(NOTES_KEY) or {}
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in notes:
            return notes[".".join(parts[:end])]
    return None


def report(summary_: dict[str, Any], regions: Sequence[str]) -> list[str]:
    """Printable lines of a summary's biomarker statistics: the present ones, then why the others are absent."""
    def fmt(key: str) -> str:
        return "–" if summary_.get(key) is None else f"{summary_[key]:.3f}"

    lines = []
    for g in ("centiloid", "metaroi"):
        if any(summary_.get(f"{g}.{stat}") is not None for stat in AGREEMENT_STATS):
            lines.append(f"{g}: r={fmt(g + '.pearson_r')} ICC(2,1)={fmt(g + '.icc21')} Bland-Altman "
                         f"bias={fmt(g + '.ba_bias')} [{fmt(g + '.ba_loa_low')}, {fmt(g + '.ba_loa_high')}]")
    if any(summary_.get(f"positivity.{k}") is not None for k in ("kappa", "sensitivity", "specificity")):
        lines.append(f"positivity: kappa={fmt('positivity.kappa')} sensitivity={fmt('positivity.sensitivity')} "
                     f"specificity={fmt('positivity.specificity')}")
    if summary_.get("braak.weighted_kappa_quadratic") is not None:
        lines.append(f"braak: weighted kappa (quadratic)={fmt('braak.weighted_kappa_quadratic')}")
    icc = [f"{r}={fmt(f'suvr.{r}.icc21')}" for r in regions if summary_.get(f"suvr.{r}.icc21") is not None]
    if icc:
        lines.append("regional SUVR ICC(2,1): " + " ".join(icc))
    by_reason: dict[str, list[str]] = {}
    for key, why in sorted((summary_.get(NOTES_KEY) or {}).items()):
        by_reason.setdefault(why, []).append(key)
    return lines + [f"absent ({why}): {', '.join(keys)}" for why, keys in by_reason.items()]
