"""MLflow models-from-code pyfunc of the generator: safetensors weights + config.yaml, no pickled torch module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np

from ganbert.models.saved import CONFIG_FILE, GENERATOR_FILE, MODEL_ARTIFACT


class GanbertGenerator(mlflow.pyfunc.PythonModel):
    """MRI (B, 1, D, H, W) in 0..255, conformed -> PET (B, T, d, h, w) in original units."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Build the generator from config.yaml and load generator.safetensors (CPU, or CUDA when present)."""
        import torch
        import yaml
        from safetensors.torch import load_file

        from ganbert import config as config_mod
        from ganbert.models import build_generator

        model_dir = Path(context.artifacts[MODEL_ARTIFACT])
        self.cfg = config_mod.from_dict(yaml.safe_load((model_dir / CONFIG_FILE).read_text()))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        generator = build_generator(self.cfg)
        generator.load_state_dict(load_file(str(model_dir / GENERATOR_FILE)))
        self.generator = generator.to(self.device).eval()

    def _volumes(self, model_input: Any) -> np.ndarray:
        """Accept an array (B, 1, D, H, W) / (1, D, H, W) / (D, H, W) or a dict {"mri": array}."""
        data = model_input.get("mri") if isinstance(model_input, dict) else model_input
        if data is None:
            raise ValueError('model_input: a dict input needs the key "mri"')
        mri = np.asarray(data, dtype=np.float32)
        while mri.ndim < 5:
            mri = mri[None]
        size = tuple(self.cfg.geometry.mri_size)
        if mri.ndim != 5 or mri.shape[1] != 1 or mri.shape[2:] != size:
            raise ValueError(f"model_input: expected MRI (B, 1, {size[0]}, {size[1]}, {size[2]}), got {mri.shape}")
        return mri

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> np.ndarray:
        """Normalise each MRI with its own stats, run the generator, restore PET units: (B, T, d, h, w) float32.

        model_input: float32 MRI (B, 1, D, H, W) in 0..255, conformed; through the logged signature MLflow
        hands it over as {"mri": array} (both forms are accepted). The hint is np.ndarray because MLflow
        turns other predict hints into a schema of its own.
        params: {"batch_size": int} volumes per forward pass (default 1).
        """
        import torch

        from ganbert.models.intensity import mri_stats, normalise_mri, restore_pet

        mri = self._volumes(model_input)
        batch = int((params or {}).get("batch_size", 1))
        if batch < 1:
            raise ValueError(f"params.batch_size must be >= 1, got {batch}")
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, mri.shape[0], batch):
                x = torch.from_numpy(mri[start: start + batch]).to(self.device)
                mean, std = mri_stats(x)
                pet = self.generator(normalise_mri(x, mean, std))
                out.append(restore_pet(pet, mean, std).float().cpu().numpy())
        return np.concatenate(out, axis=0)


mlflow.models.set_model(GanbertGenerator())
