"""The files of a model directory and of a checkpoint."""

from __future__ import annotations

# A model directory (what `ganbert synthesize` and the MLflow model load); a checkpoint holds them too.
GENERATOR_FILE = "generator.safetensors"
CONFIG_FILE = "config.yaml"
# The model card beside them (model_card.py): human-readable Markdown and the same facts as JSON.
CARD_FILE = "model_card.md"
METADATA_FILE = "metadata.json"
# Written beside a run's model directory: the URI of its MLflow model (`models:/<id>`).
MODEL_URI_FILE = "MODEL_URI"
# The artifact of the MLflow pyfunc model that holds the model directory.
MODEL_ARTIFACT = "model_dir"

# A checkpoint: every network's weights, the optimisers' tensors, and the JSON rest (no RNG state: see
# train/checkpoint.py `save_state`).
STATE_FILE = "state.json"
OPTIM_FILE = "optim.safetensors"


def network_file(name: str) -> str:
    """The weights file of network `name` in a checkpoint (`generator` -> GENERATOR_FILE)."""
    return f"{name}.safetensors"
