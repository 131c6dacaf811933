"""Experiments over many training runs: tuning, the cross-validated study, paired statistics, uncertainty, report."""
