"""Checkpoint save/resume in DeepSpeed layout with configs, RNG and data position."""
