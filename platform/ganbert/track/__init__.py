"""Tracking: MLflow runs and views, the logged pyfunc model, and the model card."""
