"""Evaluation: datasets, metrics, torch-vs-artifact comparison."""
