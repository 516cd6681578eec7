"""The generate.py worker: config, model, prompts, completions, output file.

Layout: the launcher starts as many processes as training uses (TP x PP x DP). Generation keeps
the tensor-parallel size and runs the plain layer list (no pipeline): each group of
`model_parallel_size` consecutive ranks holds all layers and is one replica; the world / TP
replicas split the batches round-robin (batch k on replica k mod replicas). Batch k's sampling
generator is seeded with seed + k, so the output does not depend on how many replicas there are.
Global rank 0 gathers every replica's completions and is the only rank that writes.

Weights come from `load` (any checkpoint layout, via megatron.checkpointing.loading); without
`load` the seeded initial weights are used, with a warning, as GPT-NeoX does. On the GPU the
weights are cast to the run's precision; on the CPU generation runs in fp32.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron.config import ConfigError, NeoXConfig, load_config
from megatron.generation.generator import generate
from megatron.generation.sampling import Sampling
from megatron.model.gpt import GPTModel, layer_defs
from megatron.parallel.device import local_device
from megatron.parallel.groups import ParallelGroups
from megatron.launcher.environment import node_layout, world_size
from megatron.tokenizer import AbstractTokenizer
from megatron.training.setup import config_tokenizer, init_distributed, load_for_inference, shutdown_distributed

Record = dict[str, object]


def generation_config(paths: list[str]) -> tuple[NeoXConfig, AbstractTokenizer]:
    """The config and tokenizer, without the training data files (generation reads none)."""
    layout = dict(world_size=world_size(), num_nodes=node_layout(paths)[0], training=False)  # as launched
    cfg = load_config(paths, require_files=False, **layout)
    tok = config_tokenizer(cfg)
    if cfg.generation.text_gen_type is None:
        raise ConfigError("set text_gen_type: 'unconditional', 'input-file' or 'interactive' "
                          "(e.g. add configs/text_generation.yml)")
    return load_config(paths, require_files=False, vocab_size=tok.vocab_size, **layout), tok


def read_prompts(path: str, prompt_end: str) -> list[str]:
    """The prompts of sample_input_file, split at prompt_end; blank ones are skipped."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"sample_input_file: file not found: {path}")
    return [p for p in file.read_text(encoding="utf-8").split(prompt_end) if p.strip()]


def encode(tok: AbstractTokenizer, text: str, max_positions: int) -> tuple[list[int], int]:
    """Prompt ids and how many were cut: an empty prompt is the end-of-text token (unconditional
    sampling), and a prompt with no room left to generate keeps its last max_positions - 1 ids."""
    ids = tok.tokenize(text) or [tok.eod]
    cut = max(0, len(ids) - (max_positions - 1))
    return ids[cut:], cut


class TextGenerator:
    """One replica's model and settings; `complete` turns a batch of prompts into records."""

    def __init__(self, cfg: NeoXConfig, tok: AbstractTokenizer, groups: ParallelGroups, model: GPTModel) -> None:
        self.cfg, self.tok, self.groups, self.model = cfg, tok, groups, model
        gen = cfg.generation
        self.sampling = Sampling(gen.temperature, gen.top_k, gen.top_p)
        self.device = next(model.parameters()).device

    def complete(self, texts: list[str], batch_index: int) -> list[Record]:
        d, gen = self.cfg.derived, self.cfg.generation
        prompts = []
        for text in texts:
            ids, cut = encode(self.tok, text, d.max_position_embeddings)
            if cut and self.groups.tp_rank == 0:  # one line per replica, not per tensor rank
                print(f"warning: a prompt of {len(ids) + cut} tokens is cut to its last {len(ids)} "
                      f"(max_position_embeddings {d.max_position_embeddings})", flush=True)
            prompts.append(ids)
        rng = torch.Generator(self.device).manual_seed(self.cfg.training.seed + batch_index)
        done = generate(self.model, prompts, gen.maximum_tokens, self.tok.eod, d.vocab_size,
                        d.max_position_embeddings, self.sampling, gen.recompute, rng, self.groups.tensor)
        return [{"context": t, "text": self.tok.detokenize(c.tokens), "length": len(c.tokens), "finished": c.finished}
                for t, c in zip(texts, done)]


def build_model(cfg: NeoXConfig, groups: ParallelGroups, device: torch.device) -> GPTModel:
    d = cfg.derived
    defs = layer_defs(cfg.model, d.padded_vocab_size, d.intermediate_size, d.max_position_embeddings,
                      cfg.training.seed, device=device, tp=groups.tensor, vocab_size=d.vocab_size)
    return load_for_inference(GPTModel(defs), cfg, groups, "generating")


def _print(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


def _layout(cfg: NeoXConfig) -> ParallelGroups:
    """Tensor-parallel groups of consecutive ranks; every group is a replica holding all layers."""
    tp, world = cfg.parallel.model_parallel_size, dist.get_world_size()
    if world % tp:
        raise ConfigError(f"model_parallel_size {tp} needs a multiple of {tp} processes, got {world}: "
                          f"launch with `python deepy.py generate.py ...`")
    groups = ParallelGroups(1, tp, world // tp)  # no sequence parallelism: prompts have any length
    if cfg.derived.pipe_stages > 1:
        _print(f"pipe_parallel_size {cfg.derived.pipe_stages}: generation runs all layers on one "
               f"stage per tensor-parallel group ({world // tp} replica(s) of {tp} rank(s))")
    return groups


def batch_replicated(gen: TextGenerator, texts: list[str]) -> list[Record]:
    """Completions of all texts, in order, on global rank 0 (an empty list elsewhere)."""
    groups, size = gen.groups, gen.cfg.derived.micro_batch_size
    batches = [texts[i:i + size] for i in range(0, len(texts), size)]
    mine: list[tuple[int, Record]] = []
    for k in range(groups.dp_rank, len(batches), groups.dp_size):
        records = gen.complete(batches[k], k)
        mine += [(k * size + i, r) for i, r in enumerate(records)] if groups.tp_rank == 0 else []
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, everyone, dst=0)
    if dist.get_rank() != 0:
        return []
    return [r for _, r in sorted((pair for part in everyone for pair in part), key=lambda p: p[0])]


def write_records(records: list[Record], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def interactive(gen: TextGenerator) -> None:
    """Rank 0 reads a prompt, every rank learns it, replica 0 completes it, rank 0 prints it."""
    while True:
        text = None
        if dist.get_rank() == 0:
            try:
                text = input("prompt ('stop' to quit) >>> ")
            except EOFError:
                text = "stop"
        box = [text]
        dist.broadcast_object_list(box, src=0)
        if box[0].strip() == "stop":
            return
        if gen.groups.dp_rank == 0:
            record = gen.complete([box[0]], 0)[0]
            _print(record["text"])


def run(paths: list[str]) -> None:
    cfg, tok = generation_config(paths)
    mode = cfg.generation.text_gen_type
    texts = []  # read before starting anything, so a missing file is a plain config error
    if mode == "unconditional":
        texts = [""] * cfg.generation.num_samples
    elif mode == "input-file":
        texts = read_prompts(cfg.generation.sample_input_file, cfg.generation.prompt_end)
    init_distributed(cfg)
    try:
        groups = _layout(cfg)
        gen = TextGenerator(cfg, tok, groups, build_model(cfg, groups, local_device()))
        if mode == "interactive":
            interactive(gen)
            return
        start = time.perf_counter()
        records = batch_replicated(gen, texts)
        if dist.get_rank() == 0:
            write_records(records, cfg.generation.sample_output_file)
            tokens = sum(r["length"] for r in records)
            print(f"wrote {len(records)} completion(s), {tokens} tokens in {time.perf_counter() - start:.1f} s, "
                  f"to {cfg.generation.sample_output_file}", flush=True)
    finally:
        shutdown_distributed()
