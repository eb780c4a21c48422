"""The two HTTP planes: data (Open Inference Protocol) and admin (status, metrics, dashboard)."""
