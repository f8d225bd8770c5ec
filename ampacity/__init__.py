"""Ampacity: run more LLM serving, training and federated learning on the GPUs and watts you have."""

__version__ = "0.1.0"
