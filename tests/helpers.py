"""Helpers for tests that run training as a user would (subprocesses of train.py / deepy.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, data_prefix: str, name: str = "run", **overrides) -> str:
    """Write a tiny-model config whose outputs go under tmp_path/name; returns its path."""
    out = tmp_path / name
    values = {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
        "rotary_pct": 0.25, "gpt_j_residual": True, "no_weight_tying": True,
        "tokenizer_type": "CharLevelTokenizer", "data_path": data_prefix, "split": "90,10,0",
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_iters": 12,
        "optimizer": {"type": "Adam", "params": {"lr": 0.003, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "min_lr": 0.0003, "warmup": 0.1, "log_interval": 1, "eval_interval": 6, "eval_iters": 2,
        "save": str(out / "ckpt"), "checkpoint_factor": 6, "log_dir": str(out / "logs"),
        "seed": 1234,
        # This framework's former defaults, which these tests were written for; GPT-NeoX's differ.
        "pos_emb": "rotary", "pipe_parallel_size": 1, "weight_decay": 0.01, "lr_decay_style": "cosine",
        "num_workers": 0,
    }
    values.update(overrides)
    values = {k: v for k, v in values.items() if v is not None}
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def save_random_gpt_neox(out: Path, text: str, vocab: int, max_positions: int, std: float) -> int:
    """A GPTNeoXForCausalLM (hidden 64, 2 layers, parallel residual, rotary on half the head) with
    random weights everywhere (norms around 1, biases too), saved in `out` with a BPE tokenizer
    trained on `text` to at most `vocab` entries (eod 0); returns the tokenizer's size."""
    import torch
    import transformers

    from megatron.tokenizer.train import train_bpe

    size = train_bpe(iter([text[i:i + 2000] for i in range(0, len(text), 2000)]), vocab, str(out / "tokenizer.json"))
    config = transformers.GPTNeoXConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192,
        max_position_embeddings=max_positions, rotary_pct=0.5, rotary_emb_base=5000, use_parallel_residual=True,
        hidden_act="gelu_fast", tie_word_embeddings=False, layer_norm_eps=1e-6, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm.weight" in name else 0.0, std)
    model.save_pretrained(str(out))
    return size


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline")
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def metrics(log_dir: Path, kind: str = "train") -> list[dict]:
    lines = (Path(log_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def run_distributed(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) in `world_size` gloo processes (OLMo-core's pattern).

    fn must live in an importable module (spawned children import it by name)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_init_and_run, args=(world_size, port, fn, args), nprocs=world_size, join=True)


def _init_and_run(rank: int, world_size: int, port: int, fn, args) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
