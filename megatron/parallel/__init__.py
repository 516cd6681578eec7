"""Parallelism applied to the plain model from outside: devices, backends, pipeline wrapping."""
