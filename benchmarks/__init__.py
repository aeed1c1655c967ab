"""Measurements of devft against its baselines; results and the commands that made them are in RESULTS.md."""
