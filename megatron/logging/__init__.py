"""Metrics output of training runs: console line, metrics.jsonl, TensorBoard, wandb."""

from megatron.logging.metrics import MetricsLogger

__all__ = ["MetricsLogger"]
