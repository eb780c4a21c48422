"""mlproxy: serve ONNX model versions behind canary, shadow and blue-green deployments."""

__version__ = "0.4.0"
