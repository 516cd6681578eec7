"""Time of one optimizer step of a layout on a cluster, split by cause.

The model (docs/planner.md has the formulas) charges the slowest pipeline stage's micro-batch:
matmuls at a shape-dependent fraction of the datasheet peak, elementwise kernels at HBM
bandwidth, tensor-parallel all-reduces over the link the TP group sits on, and point-to-point
sends between stages; the pipeline runs m + (p - 1) / v such micro-batch times (1F1B, v virtual
stages when interleaved); then the exposed part of the data-parallel gradient reduction and the
optimizer's pass over its state. The constants below are the only calibrated numbers; the same
values serve every run and cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.model.sizing import stage_layer_ranges
from megatron.planning.cluster import Cluster
from megatron.planning.memory import Layout, ModelShape, layer_activation_bytes, stage_parameters
from megatron.training.flops import flops_per_token

# Fraction of the datasheet dense peak a large matmul reaches (cuBLAS on A100/H100 reaches
# 70-85% on big bf16 GEMMs; end-to-end training loses more to launch gaps and synchronisation,
# so this is the sustained fraction inside a training step, calibrated once on the published runs).
MATMUL_EFFICIENCY = 0.66
# A matmul dimension of this size runs at half the efficiency of a large one: tiles (128 wide on
# tensor cores) are partly empty and small problems fill fewer streaming multiprocessors. Each of
# M, N, K contributes a factor d / (d + MATMUL_HALF_DIM).
MATMUL_HALF_DIM = 40
# Collectives reach this fraction of the link bandwidth the cluster file states (NCCL's "bus
# bandwidth" on NVLink and InfiniBand is 75-90% of the line rate).
COMM_EFFICIENCY = 0.8
# Elementwise kernels (norms, activations, softmax, dropout, residual adds, casts) touch each byte
# of the activations a layer keeps about this many times over forward and backward (written and
# read in forward, read in backward, its gradient written and read).
ELEMENTWISE_PASSES = 5.0
# DeepSpeed's pipeline engine runs 1F1B as lockstep steps, each a forward or a backward, with
# blocking sends: filling and draining the pipeline costs about this many times (p - 1)
# micro-batch times instead of once (Megatron-LM's schedule with non-blocking sends).
BLOCKING_FILL = 2.0
# Adam's step reads and writes, per parameter it updates: fp32 master, m and v read and written
# (24 bytes), the gradient read (4) and the half-precision copy written (2); fp32 training: 28.
OPTIMIZER_BYTES_HALF = 30
OPTIMIZER_BYTES_FP32 = 28


@dataclass(frozen=True)
class Kernels:
    """How a run's kernels differ from this framework's, for runs published by other frameworks.

    flash_attention: this framework's SDPA keeps no seq x seq scores; the runs of 2021-22
    (Megatron-LM, GPT-NeoX-20B, MT-NLG) materialised them (Korthikanti's 5 a s^2 b bytes per layer),
    which enters as elementwise traffic. scatter_gather: Megatron-LM sends 1/t of each pipeline
    activation per TP rank and all-gathers it over NVLink. overlap_dp: the data-parallel reduce
    overlaps the last micro-batch's backward (DeepSpeed's overlap_comm; Megatron-LM 2021 did not)."""

    flash_attention: bool = True
    scatter_gather: bool = False
    blocking_pipeline: bool = True
    overlap_dp: bool | None = None  # None: the config's overlap_comm


@dataclass(frozen=True)
class StepTime:
    compute: float  # matmuls and elementwise of every micro-batch on the slowest stage, no bubble
    tensor_parallel: float  # TP all-reduces (or SP reduce-scatter + all-gather), not overlapped
    bubble: float  # pipeline fill and drain
    pipeline_p2p: float  # sends between stages
    data_parallel: float  # the exposed part of the gradient reduce and ZeRO's parameter gather
    optimizer: float
    model_flops: float  # per step, all GPUs: forward + backward, no recomputation
    hardware_flops: float  # the same plus the recomputed forward (what the papers count)
    tokens: int  # per step

    @property
    def total(self) -> float:
        return self.compute + self.tensor_parallel + self.bubble + self.pipeline_p2p + self.data_parallel + self.optimizer


def _eff(top: float, *dims: float) -> float:
    e = top
    for d in dims:
        e *= d / (d + MATMUL_HALF_DIM)
    return e


def _ring(nbytes: float, n: int, bandwidth_gbs: float, latency_us: float, factor: float) -> float:
    """A ring collective over n ranks moving `factor` x (n-1)/n x nbytes through each rank's link
    (factor 2 for all-reduce, 1 for reduce-scatter or all-gather)."""
    if n <= 1:
        return 0.0
    steps = factor * (n - 1)
    return factor * (n - 1) / n * nbytes / (bandwidth_gbs * 1e9 * COMM_EFFICIENCY) + steps * latency_us * 1e-6


def _link(cluster: Cluster, span: int) -> tuple[float, float]:
    """(bandwidth, latency) of a group whose ranks are `span` ranks apart in total: inside a node
    when the whole group fits in one."""
    if span <= cluster.gpus_per_node:
        return cluster.intra_node_bandwidth_gbs, cluster.intra_node_latency_us
    return cluster.inter_node_bandwidth_gbs, cluster.inter_node_latency_us


def _layer_flops(shape: ModelShape, vocab: int) -> tuple[float, float, float]:
    """(dense matmuls of one layer, its attention-score matmuls, the output layer), training FLOPs
    per token, taken apart from flops_per_token so that there is one FLOPs formula."""
    kw = dict(hidden_size=shape.hidden, padded_vocab_size=vocab, ffn_hidden_size=shape.ffn, gated=shape.gated,
              kv_hidden_size=shape.kv_hidden)
    one = flops_per_token(num_layers=1, seq_length=shape.seq, **kw)
    layer = flops_per_token(num_layers=2, seq_length=shape.seq, **kw) - one
    # The score matmuls are the part of a layer linear in the sequence length.
    per_position = (flops_per_token(num_layers=2, seq_length=shape.seq + 1, **kw)
                    - flops_per_token(num_layers=1, seq_length=shape.seq + 1, **kw)) - layer
    scores = per_position * shape.seq
    return float(layer - scores), float(scores), float(one - layer)


def step_time(shape: ModelShape, lay: Layout, cluster: Cluster, kernels: Kernels = Kernels()) -> StepTime:
    """Seconds per optimizer step of `lay` on `cluster`; see the module docstring."""
    h, s, t, b = shape.hidden, shape.seq, lay.tp, lay.micro_batch
    vocab = shape.padded_vocab(t)
    tokens_mb = b * s
    elem = 2 if lay.half else 4
    peak = cluster.peak_flops
    hbm = cluster.hbm_bandwidth_gbs * 1e9
    dense, scores, output = _layer_flops(shape, vocab)
    top = cluster.matmul_efficiency if cluster.matmul_efficiency is not None else MATMUL_EFFICIENCY
    head_dim = h // shape.heads
    # Each dense matmul is [b*s, K] x [K, N] with one of K, N split by TP; the FLOPs-weighted
    # shapes: QKV (h -> (h + 2kv)/t), attention out (h/t -> h), MLP up (h -> f'/t), down (f/t -> h).
    f_up = (2 if shape.gated else 1) * shape.ffn
    gemms = [(h, (h + 2 * shape.kv_hidden) / t), (h / t, h), (h, f_up / t), (shape.ffn / t, h)]
    weights = [k * n for k, n in gemms]
    dense_eff = sum(weights) / sum(w / _eff(top, tokens_mb, k, n) for w, (k, n) in zip(weights, gemms))
    # Scores: per head [s, d] x [d, s] and [s, s] x [s, d].
    score_eff = _eff(top, s, s, head_dim)
    layer_matmul = tokens_mb / t * (dense / dense_eff + scores / score_eff) / peak  # fwd+bwd
    # Elementwise traffic in proportion to what the layer keeps for backward (memory.py), plus the
    # materialised scores of a non-flash kernel (5 a s^2 b bytes at 2 bytes per score).
    kept = layer_activation_bytes(shape, lay)
    if not kernels.flash_attention:
        kept += 5 * shape.heads * s * s * b // t * (elem // 2)
    layer_elementwise = ELEMENTWISE_PASSES * kept / hbm
    # Recomputation repeats the forward: a third of the matmuls, half the elementwise passes.
    recompute = (layer_matmul / 3 + layer_elementwise / 2) if lay.checkpoint else 0.0
    layer_time = layer_matmul + layer_elementwise + recompute
    out_time = tokens_mb / t * output / (peak * _eff(top, tokens_mb, h, vocab / t))

    # Tensor parallelism: all-reduces of [b, s, h] per layer: one per forward with the parallel
    # residual, two without; the same in backward and in a recomputed forward.
    bw, lat = _link(cluster, t)
    per_pass = 1 if shape.parallel_residual else 2
    passes = 2 + (1 if lay.checkpoint else 0)
    tp_layer = passes * per_pass * _ring(tokens_mb * h * elem, t, bw, lat, 2.0)

    ranges = stage_layer_ranges(shape.num_layers, lay.pp)
    stage_times = []
    for i, r in enumerate(ranges):
        c = len(r) * layer_time + (out_time if i == lay.pp - 1 else 0.0)
        stage_times.append((c, len(r) * tp_layer))
    comp_mb, tp_mb = max(stage_times, key=lambda x: x[0] + x[1])

    # Point-to-point: each micro-batch sends its activation forward and its gradient back, on the
    # link between neighbouring stages (DeepSpeed and Megatron place a stage's TP x DP ranks
    # together: neighbours are tp x dp ranks apart). Interleaving sends v times as often.
    p2p_mb = 0.0
    v = lay.virtual_stages
    if lay.pp > 1:
        pbw, plat = _link(cluster, t * lay.dp + 1)
        size = tokens_mb * h * elem / (t if kernels.scatter_gather else 1)
        p2p_mb = 2 * v * (size / (pbw * 1e9 * COMM_EFFICIENCY) + plat * 1e-6)
    m = lay.grad_accum
    compute = m * comp_mb
    tensor_parallel = m * tp_mb
    pipeline_p2p = m * p2p_mb
    fill = (lay.pp - 1) / v * (BLOCKING_FILL if kernels.blocking_pipeline else 1.0)
    bubble = fill * (comp_mb + tp_mb + p2p_mb)

    # Data parallelism: gradients reduce-scattered (ZeRO >= 1) or all-reduced; ZeRO 1-2 then
    # all-gather the updated half-precision weights, ZeRO-3 gathers them for every pass.
    params = max(stage_parameters(shape, t, lay.pp))
    grad_bytes = params * elem
    # A data-parallel group's ranks are tp apart: it spans tp x dp ranks, nodes when more than one.
    dbw, dlat = _link(cluster, t * lay.dp)
    reduce = _ring(grad_bytes, lay.dp, dbw, dlat, 1.0 if lay.zero_stage >= 1 else 2.0)
    gather = _ring(grad_bytes, lay.dp, dbw, dlat, 1.0) if lay.zero_stage in (1, 2) else 0.0
    if lay.zero_stage >= 3:
        gather = 2 * m * _ring(grad_bytes, lay.dp, dbw, dlat, 1.0)
    overlap = lay.overlap_comm if kernels.overlap_dp is None else kernels.overlap_dp
    # Gradients are reduced at the accumulation boundary: overlap hides the reduce behind the
    # last micro-batch's backward at most.
    exposed = max(0.0, reduce - comp_mb * 2 / 3) if overlap else reduce
    data_parallel = exposed + gather

    local = params / (lay.dp if lay.zero_stage >= 1 else 1)
    opt_bytes = OPTIMIZER_BYTES_HALF if lay.half else OPTIMIZER_BYTES_FP32
    optimizer = (local * opt_bytes + params * elem) / hbm  # + the gradient-norm pass over all local grads

    total_tokens = lay.dp * m * tokens_mb
    layers_flops = shape.num_layers * (dense + scores)
    model = total_tokens * (layers_flops + output)
    hardware = model + (total_tokens * layers_flops / 3 if lay.checkpoint else 0.0)
    return StepTime(compute=compute, tensor_parallel=tensor_parallel, bubble=bubble, pipeline_p2p=pipeline_p2p,
                    data_parallel=data_parallel, optimizer=optimizer, model_flops=model, hardware_flops=hardware,
                    tokens=total_tokens)


@dataclass(frozen=True)
class Throughput:
    step_seconds: float
    tokens_per_second: float
    tflops_per_gpu: float  # hardware FLOPs (recomputation counted), the papers' convention
    mfu: float  # model FLOPs / peak


def throughput(st: StepTime, world: int, cluster: Cluster) -> Throughput:
    sec = st.total
    return Throughput(step_seconds=sec, tokens_per_second=st.tokens / sec,
                      tflops_per_gpu=st.hardware_flops / sec / world / 1e12,
                      mfu=st.model_flops / sec / world / cluster.peak_flops)
