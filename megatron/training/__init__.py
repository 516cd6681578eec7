"""Training: optimizer, LR schedule, the DeepSpeed engine, the loop, FLOPs accounting."""
