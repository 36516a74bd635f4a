"""Experiment suite: data pipelines, configs and the `python -m experiments.run` job."""
