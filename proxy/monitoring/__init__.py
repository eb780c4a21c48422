"""Watching what is served: histograms, baseline, drift tests, feedback, alerts, webhook."""
