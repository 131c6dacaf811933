"""Phantom cohort in ADNI download layout: MNI152-based T1 and multi-frame PET (AV45, AV1451, FDG) with ground truth.

`anatomy` (template, subject, T1) -> `uptake` (tracer SUVRs, PET frames) -> `layout` (ADNI folders, CSV, standard
space, DICOM); `ganbert phantom --out DIR` runs `layout.main`.
"""

from ganbert.ingest.phantom.anatomy import LABEL, REGIONS, SIZES, make_subject
from ganbert.ingest.phantom.layout import (
           DICOM_IDENTITY,
           FORMATS,
           HEADER_TEXT,
           PET_SPACES,
           STANDARD_GRIDS,
           main,
           write_cohort,
)
from ganbert.ingest.phantom.site import SITES, Site
from ganbert.ingest.phantom.uptake import REFERENCE

__all__ = ["DICOM_IDENTITY", "FORMATS", "HEADER_TEXT", "LABEL", "PET_SPACES", "REFERENCE", "REGIONS", "SITES", "SIZES",
           "STANDARD_GRIDS", "Site", "main", "make_subject", "write_cohort"]
