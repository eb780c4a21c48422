"""The model repository (manifest, sha256, onnxruntime sessions) and backends (local, remote)."""
