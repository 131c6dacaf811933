"""Inference: `ganbert synthesize` on new T1s, its QC picture, reference scoring, ensembles and the region atlas."""
