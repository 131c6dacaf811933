"""Scoring: image metrics, PET biomarkers, and the evaluation of a generator on a split (`ganbert evaluate`)."""
