"""Measure on this machine what the planner predicts: peak memory and step time of a CPU run.

`measure`: the config's model (the same layer list training builds) in one process, trained with
torch's Adam on random tokens: `grad_accum` micro-batches of forward and backward, then a step.
One process means TP 1, PP 1, DP 1 in fp32; the layouts compared vary what one process can vary
(micro-batch, checkpointing, architecture).

`measure_engine`: one rank of a multi-process layout (TP, PP, DP, ZeRO) in a gloo group, trained
through the framework's own DeepSpeed engine (`megatron.training.engine.build_engine`), so
DeepSpeed's allocations are in the measurement: ZeRO's flat fp32 master partition, its
gradient buckets, the pipeline engine's buffers. What is alive before the profiled step is not
named attribute by attribute there but found: every distinct tensor storage reachable from Python
objects (the garbage collector's view) plus their `.grad`s, which autograd creates in C++.

Memory is measured as torch's CPU allocator reports it to the profiler (`profile_memory=True`):
every allocation and free of every tensor, autograd's saved tensors included, in order; the peak
of the running sum during one training step, plus what was live before the step (weights,
gradients and optimizer state, counted from their storages), is the step's peak. The profiler
records no free of a block allocated before it started, so a tensor alive before the step and
freed in it still counts at the peak: an over-count, where there is one, of at most that tensor. Python objects
and the interpreter are not tensors and are not counted, as the planner does not count them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megatron.config import NeoXConfig
from megatron.model.gpt import GPTModel, layer_defs
from megatron.model.loss import lm_loss


@dataclass(frozen=True)
class Measured:
    peak_bytes: int  # the step's peak of live tensor bytes
    state_bytes: int  # weights + gradients + optimizer state before the step
    step_seconds: float  # the fastest of the timed steps (nan where none was timed)
    stage: int = 0  # the pipeline stage of the measured rank


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _build(cfg: NeoXConfig) -> tuple[GPTModel, torch.optim.Optimizer]:
    d, t = cfg.derived, cfg.training
    if (cfg.parallel.model_parallel_size, d.pipe_stages, d.data_parallel_size) != (1, 1, 1):
        raise ValueError("the CPU measurement runs one process: TP 1, PP 1, DP 1")
    if d.precision != "fp32":
        raise ValueError("the CPU measurement trains in fp32")
    defs = layer_defs(cfg.model, d.padded_vocab_size, d.intermediate_size, d.max_position_embeddings,
                      t.seed, device="cpu", vocab_size=d.vocab_size)
    model = GPTModel(defs, checkpoint_num_layers=t.checkpoint_num_layers if t.checkpoint_activations else 0)
    model.train()
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def _step(model: GPTModel, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    # Gradients stay allocated between steps (set_to_none=False), as DeepSpeed's gradient buffers do.
    opt.zero_grad(set_to_none=False)
    for tokens in batches:
        logits = model(tokens[:, :-1])
        loss = lm_loss(logits, tokens[:, 1:]) / len(batches)
        del logits
        loss.backward()
        del loss
    opt.step()


def measure(cfg: NeoXConfig, timed_steps: int = 0) -> Measured:
    """Train two steps (the first creates gradients and optimizer state), profile the memory of
    the third, then time `timed_steps` more."""
    from torch.profiler import ProfilerActivity, profile

    d = cfg.derived
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, d.vocab_size, (d.micro_batch_size, cfg.model.seq_length + 1), generator=gen)
               for _ in range(d.gradient_accumulation_steps)]
    model, opt = _build(cfg)
    for _ in range(2):
        _step(model, opt, batches)
    state = [p for p in model.parameters()] + [p.grad for p in model.parameters()]
    state += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    before = _storage_bytes(state)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, opt, batches)
    peak = _step_peak(prof)
    best = float("inf")
    for _ in range(timed_steps):
        start = time.perf_counter()
        _step(model, opt, batches)
        best = min(best, time.perf_counter() - start)
    return Measured(peak_bytes=before + peak, state_bytes=before, step_seconds=best)


def _step_peak(prof) -> int:
    """The peak of the running sum of the CPU allocations and frees the profiler recorded."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python objects: the engine's weights,
    its gradient buffers, the optimizer's state and ZeRO's flat fp32 partitions, and whatever
    pipeline buffers DeepSpeed keeps between steps, without naming DeepSpeed's attributes."""
    import gc
    import warnings

    gc.collect()
    # isinstance on torch.distributed's deprecated reduce_op warns, and so does .grad of a non-leaf.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device.type == "cpu"]
        # Gradients autograd accumulated in C++ have no Python object of their own until read.
        grads = [t.grad for t in tensors]
    return _storage_bytes(tensors + grads)


def measure_engine(cfg: NeoXConfig) -> Measured:
    """This rank's peak under the framework's DeepSpeed engine (any TP, PP, DP and ZeRO stage of a
    gloo group the caller has initialised; every rank of it calls this): two warm-up steps, then the
    profiled third. Random tokens; no data files or checkpoints are read."""
    from torch.profiler import ProfilerActivity, profile

    from megatron.parallel.groups import ParallelGroups
    from megatron.parallel.random import seed_tp_rng
    from megatron.training.engine import build_engine

    d, par = cfg.derived, cfg.parallel
    if d.precision != "fp32":
        raise ValueError("the CPU measurement trains in fp32")
    torch.manual_seed(cfg.training.seed)
    groups = ParallelGroups(d.pipe_stages, par.model_parallel_size, d.data_parallel_size, par.sequence_parallel)
    seed_tp_rng(cfg.training.seed, groups.tp_rank)
    stepper, _, _ = build_engine(cfg, groups)
    # Every data-parallel rank its own tokens; tensor-parallel ranks and pipeline stages the same.
    gen = torch.Generator().manual_seed(1 + groups.dp_rank)
    tokens = [torch.randint(0, d.vocab_size, (d.micro_batch_size, cfg.model.seq_length + 1), generator=gen)
              for _ in range(d.gradient_accumulation_steps)]
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    for _ in range(2):
        stepper.train_batch(iter(batches))
    before = _live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        stepper.train_batch(iter(batches))
    return Measured(peak_bytes=before + _step_peak(prof), state_bytes=before, step_seconds=float("nan"),
                    stage=groups.pp_rank)
