"""Serving side: bundle loading, the ONNX Runtime engine and the gRPC service. Never imports torch."""
