"""Monitoring: streaming statistics per model version (pure numpy) and their Prometheus export."""
