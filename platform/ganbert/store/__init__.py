"""The shard store: the Parquet shard format, splits and folds, dataset statistics, and the loader."""
