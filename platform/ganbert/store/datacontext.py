"""Ray Data context for preprocessing and the loader: rows in order, no progress bars, warnings only."""

from __future__ import annotations


def quiet_data_context() -> None:
    """Set the current Ray Data context: preserve_order on, progress bars and start-up prints off."""
    import logging

    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    for attr in ("enable_operator_progress_bars", "print_on_execution_start"):
        if hasattr(ctx, attr):
            setattr(ctx, attr, False)
