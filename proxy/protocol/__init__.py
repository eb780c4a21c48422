"""The Open Inference Protocol (KServe V2) codec: request and response bytes <-> numpy."""
