"""Observability of the coordinator: Prometheus metrics (`metrics.py`) served on its HTTP app."""
