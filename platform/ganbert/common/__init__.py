"""Shared utilities of every stage: atomic writes, the ganbert home, progress lines, the Ray session, figures."""
