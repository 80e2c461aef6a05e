"""Thin gRPC / Ray Serve adapters around ola_model entry points."""
