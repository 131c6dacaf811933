"""Biomarker statistics against textbook values and hand computations: ICC(2,1), Pearson r, Bland-Altman,
Cohen's and weighted kappa, sensitivity / specificity, Centiloid and Braak staging, and their undefined cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from ganbert.scoring import biomarkers as bm

# Shrout & Fleiss 1979, Table 2: 6 targets rated by 4 judges; their Table 4 gives ICC(2,1) = .29.
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float)


def test_icc_2_1_reproduces_shrout_and_fleiss_table_2() -> None:
    assert bm.icc_2_1(SHROUT_FLEISS) == pytest.approx(0.29, abs=0.005)
    # by hand from the mean squares of their Table 3 (BMS 11.24, JMS 32.49, EMS 1.02; n 6, k 4), rounded as printed
    bms, jms, ems = 11.24, 32.49, 1.02
    assert bm.icc_2_1(SHROUT_FLEISS) == pytest.approx((bms - ems) / (bms + 3 * ems + 4 * (jms - ems) / 6), rel=2e-3)
    same = np.repeat(np.array([[1.0], [2.0], [4.0]]), 2, axis=1)
    assert bm.icc_2_1(same) == pytest.approx(1.0)
    assert bm.icc_2_1(same + np.array([0.0, 1.0])) < 1.0  # absolute agreement: a constant offset costs
    with pytest.raises(bm.Undefined, match="at least 3"):
        bm.icc_2_1(same[:2])
    with pytest.raises(bm.Undefined, match="variance"):
        bm.icc_2_1(np.ones((4, 2)))


def test_pearson_r_and_its_undefined_cases() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=20), rng.normal(size=20)
    assert bm.pearson_r(a, b) == pytest.approx(float(np.corrcoef(a, b)[0, 1]), rel=1e-12)
    assert bm.pearson_r([1, 2, float("nan"), 3], [2, 4, 5, 6]) == pytest.approx(1.0)  # NaN pairs are dropped
    with pytest.raises(bm.Undefined, match="at least 3 subjects"):
        bm.pearson_r([1, 2, float("nan")], [1, 2, 3])
    with pytest.raises(bm.Undefined, match="constant"):
        bm.pearson_r([1, 1, 1], [1, 2, 3])


def test_bland_altman_on_a_constructed_pair() -> None:
    real = np.array([1.0, 2.0, 3.0, 4.0])
    fake = real + np.array([0.1, 0.3, 0.1, 0.3])  # differences: mean 0.2, sample SD sqrt(0.04 / 3)
    bias, low, high = bm.bland_altman(real, fake)
    sd = math.sqrt(0.04 / 3)
    assert (bias, low, high) == pytest.approx((0.2, 0.2 - 1.96 * sd, 0.2 + 1.96 * sd), rel=1e-12)
    stats = bm.agreement(real, fake)
    assert stats["ba_bias"] == pytest.approx(0.2) and stats["pearson_r"] == pytest.approx(bm.pearson_r(real, fake))
    few = bm.agreement([1.0, 2.0], [1.0, 2.5])
    assert all(isinstance(v, str) and "at least 3" in v for v in few.values())  # reasons, never 0


def test_cohen_kappa_sensitivity_specificity_from_a_2x2_table() -> None:
    # real+ fake+ 20, real+ fake- 5, real- fake+ 10, real- fake- 15: po = 0.7, pe = 0.5*0.6 + 0.5*0.4 = 0.5
    real = [1.0] * 25 + [0.0] * 25
    fake = [1.0] * 20 + [0.0] * 5 + [1.0] * 10 + [0.0] * 15
    assert bm.kappa(real, fake, (0, 1)) == pytest.approx(0.4)
    assert bm.sensitivity(real, fake) == pytest.approx(20 / 25)
    assert bm.specificity(real, fake) == pytest.approx(15 / 25)
    assert bm.kappa([1, 0, 1], [1, 0, 1], (0, 1)) == pytest.approx(1.0)
    assert bm.kappa([1, 1, 1], [1, 0, 1], (0, 1)) == pytest.approx(0.0)  # one constant read: no better than chance
    for fake in ([1, 1, 1], [0, 0, 0]):  # both reads constant, equal or opposite: undefined, not 0
        with pytest.raises(bm.Undefined, match="constant"):
            bm.kappa([1, 1, 1], fake, (0, 1))
    with pytest.raises(bm.Undefined, match="at least 3"):
        bm.kappa([1, 0], [1, 0], (0, 1))
    with pytest.raises(bm.Undefined, match="positive"):
        bm.sensitivity([0, 0, 0], [0, 1, 0])
    with pytest.raises(bm.Undefined, match="negative"):
        bm.specificity([1, 1], [1, 0])
    with pytest.raises(ValueError, match="categories"):
        bm.kappa([0, 2, 1], [0, 1, 1], (0, 1))


def test_weighted_kappa_by_hand_and_against_sklearn() -> None:
    # 8 subjects, 3 ordered stages, 3 reads off by one stage: sum(w * observed) = 3/8 for linear and quadratic.
    # Marginals real (3, 2, 3)/8, fake (2, 3, 3)/8 -> expected weight: off by one 28/64, off by two 15/64.
    real = [0, 0, 0, 1, 1, 2, 2, 2]
    fake = [0, 0, 1, 1, 2, 2, 1, 2]
    assert bm.kappa(real, fake, (0, 1, 2), "linear") == pytest.approx(1 - (3 / 8) / (58 / 64))
    assert bm.kappa(real, fake, (0, 1, 2), "quadratic") == pytest.approx(1 - (3 / 8) / (88 / 64))  # 8/11
    rng = np.random.default_rng(5)
    a = rng.integers(0, 4, 40)
    b = np.clip(a + rng.integers(-1, 2, 40), 0, 3)
    for weights in ("linear", "quadratic"):
        assert bm.kappa(a, b, bm.BRAAK_CODES, weights) == pytest.approx(cohen_kappa_score(a, b, weights=weights))
    assert bm.kappa(a, b, bm.BRAAK_CODES) == pytest.approx(cohen_kappa_score(a, b))
    with pytest.raises(ValueError, match="weights"):
        bm.kappa(a, b, bm.BRAAK_CODES, "cubic")


def test_centiloid_and_braak_stage() -> None:
    # Royse et al. 2021: the ADNI florbetapir cut-off SUVR 1.11 is 20 CL on the Berkeley whole-cerebellum scale
    assert bm.centiloid(1.11) == pytest.approx(19.7642) and round(bm.centiloid(1.11)) == 20
    assert math.isnan(bm.centiloid(float("nan")))
    # Maass et al. 2017: late-to-early, strictly above the thresholds V/VI 1.87, III/IV 1.30, I/II 1.13
    assert bm.braak_stage(1.13, 1.30, 1.87) == 0.0
    assert bm.braak_stage(1.14, 1.0, 1.0) == 1.0
    assert bm.braak_stage(1.0, 1.31, 1.0) == 2.0  # the latest ROI above its threshold decides
    assert bm.braak_stage(1.5, 1.5, 1.9) == 3.0
    assert math.isnan(bm.braak_stage(1.5, float("nan"), 1.0))


def _subjects(n: int) -> list[dict[str, float]]:
    rng = np.random.default_rng(11)
    out = []
    for _ in range(n):
        real = float(rng.uniform(1.0, 1.8))
        fake = real + float(rng.normal(0.0, 0.05))
        out.append({"suvr_real.neocortex": real, "suvr_fake.neocortex": fake, "centiloid_real": bm.centiloid(real),
                    "centiloid_fake": bm.centiloid(fake), "positive_real": float(real > 1.11),
                    "positive_fake": float(fake > 1.11)})
    return out


def test_cohort_summary_values_and_reasons() -> None:
    regions, subjects = ("cerebellum_gm", "neocortex"), _subjects(12)
    s = bm.summary(subjects, "AV45", regions, ("cerebellum_gm",))
    assert set(s) == {*bm.summary_keys(regions), bm.NOTES_KEY}
    real = [x["centiloid_real"] for x in subjects]
    fake = [x["centiloid_fake"] for x in subjects]
    assert s["centiloid.icc21"] == pytest.approx(bm.icc_2_1(np.stack([real, fake], axis=1)))
    assert s["centiloid.ba_bias"] == pytest.approx(float(np.mean(np.subtract(fake, real))))
    assert s["suvr.neocortex.pearson_r"] == pytest.approx(bm.pearson_r([x["suvr_real.neocortex"] for x in subjects],
                                                                       [x["suvr_fake.neocortex"] for x in subjects]))
    assert s["positivity.kappa"] is not None
    assert bm.note_for(s, "suvr.cerebellum_gm.icc21") == "reference region of AV45"
    assert "AV1451 only" in bm.note_for(s, "braak.weighted_kappa_quadratic")
    assert "FDG only" in bm.note_for(s, "metaroi.icc21") and s["metaroi.icc21"] is None
    few = bm.summary(subjects[:2], "AV45", regions, ("cerebellum_gm",))
    assert few["centiloid.icc21"] is None and "at least 3" in bm.note_for(few, "centiloid.icc21")
    assert few["positivity.kappa"] is None and bm.note_for(few, "positivity.kappa")
    for absent in (bm.summary([], "AV45", regions, ()), bm.summary(subjects, None, regions, ())):
        assert all(absent[k] is None and bm.note_for(absent, k) for k in bm.summary_keys(regions))
    lines = bm.report(s, regions)
    assert lines[0].startswith("centiloid: r=") and "absent (AV1451 only; this split is AV45): braak" in lines
