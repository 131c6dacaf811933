"""Data layer: phantom cohort, ADNI ingest, preprocessing to Parquet shards on Ray Data, and the shard loader."""
