"""Preparation: T1/PET pairing, T1 QC, grids, registration, brain masks and the Ray Data preprocessing to shards."""
