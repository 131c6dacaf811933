"""Ingest: the ADNI download tree, DICOM and NIfTI readers, and the phantom cohort that stands in for ADNI."""
