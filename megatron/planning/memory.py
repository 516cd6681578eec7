"""Memory per device, by category, for the heaviest pipeline stage of a layout.

The model and the layout are separate so that `--search` can price layouts the config does not
name: `ModelShape` is what the architecture fixes (read once from the config, parameters counted
exactly on the meta device), `Layout` is what a run may choose (TP, PP, micro-batch, ZeRO,
checkpointing). docs/planner.md states every formula; the comments here say why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from megatron.config import NeoXConfig
from megatron.config.schema import GATED_ACTIVATIONS
from megatron.model.sizing import meta_model, stage_layer_ranges
from megatron.tokenizer.tokenizer import pad_vocab_size


@dataclass(frozen=True)
class ModelShape:
    """The architecture's numbers the planner needs; parameters split into what tensor
    parallelism shards and what every tensor-parallel rank replicates."""

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int  # the activation's output width (a gated MLP's up-projection has 2 x ffn rows)
    gated: bool
    seq: int
    vocab: int  # the tokenizer's, before padding
    vocab_multiple: int  # make_vocab_size_divisible_by: the padding grows with TP
    tied: bool
    parallel_residual: bool
    hidden_dropout: bool
    rotary: bool
    norm: str
    # Per transformer layer, and for the embedding / final norm / output layer:
    # (elements tensor parallelism shards, elements replicated on every TP rank).
    layer_params: tuple[int, int]
    embed_params: tuple[int, int]  # at the config's padded vocabulary, see `padded_vocab`
    norm_params: tuple[int, int]
    out_params: tuple[int, int]
    padded_vocab_at_config: int
    total_parameters: int

    @property
    def kv_hidden(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def padded_vocab(self, tp: int) -> int:
        return pad_vocab_size(self.vocab, self.vocab_multiple, tp)


@dataclass(frozen=True)
class Layout:
    """What a run chooses: parallel sizes, batch split, ZeRO, checkpointing, precision."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    grad_accum: int
    zero_stage: int
    checkpoint: bool
    checkpoint_num_layers: int
    sequence_parallel: bool
    partition_activations: bool
    precision: str
    reduce_bucket: int  # DeepSpeed's reduce_bucket_size (elements)
    overlap_comm: bool
    # ZeRO's contiguous_gradients: gradients are copied into a bucket as backward produces them.
    contiguous_gradients: bool = False
    # Interleaved 1F1B (Megatron-LM's virtual pipeline stages). This framework runs 1 (DeepSpeed's
    # 1F1B); published runs that interleaved enter the step-time model through it.
    virtual_stages: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def half(self) -> bool:
        return self.precision in ("fp16", "bfloat16")

    def with_(self, **changes) -> "Layout":
        return replace(self, **changes)


def _split(module) -> tuple[int, int]:
    """(sharded, replicated) elements of a module built at TP 1: the layers mark what tensor
    parallelism splits (`tp_sharded`)."""
    sharded = sum(p.numel() for p in module.parameters() if getattr(p, "tp_sharded", False))
    return sharded, sum(p.numel() for p in module.parameters()) - sharded


def model_shape(cfg: NeoXConfig) -> ModelShape:
    """Count the config's model on the meta device; nothing is allocated."""
    d, m = cfg.derived, cfg.model
    if d.padded_vocab_size is None:
        raise ValueError("the vocabulary size is unknown: set vocab_size or a tokenizer")
    model = meta_model(cfg)
    L, tied = m.num_layers, not m.no_weight_tying
    mods = list(model.layers)  # [embedding, L layers, final norm, output unless tied]
    # The meta model is built unsharded (one tensor-parallel rank), so these are TP 1's counts.
    at_tp1 = _split

    layer = at_tp1(mods[1])
    if any(at_tp1(b) != layer for b in mods[2:1 + L]):
        raise ValueError("layers of different sizes: the planner assumes identical transformer layers")
    return ModelShape(
        num_layers=L, hidden=m.hidden_size, heads=m.num_attention_heads, kv_heads=d.num_kv_heads,
        ffn=d.intermediate_size, gated=m.activation in GATED_ACTIVATIONS, seq=m.seq_length,
        vocab=d.vocab_size, vocab_multiple=m.make_vocab_size_divisible_by, tied=tied,
        parallel_residual=bool(m.gpt_j_residual), hidden_dropout=m.hidden_dropout > 0,
        rotary=m.pos_emb == "rotary", norm=m.norm,
        layer_params=layer, embed_params=at_tp1(mods[0]), norm_params=at_tp1(mods[1 + L]),
        out_params=at_tp1(mods[0] if tied else mods[2 + L]),
        padded_vocab_at_config=d.padded_vocab_size,
        total_parameters=sum(p.numel() for p in model.parameters()),
    )


def layout_of(cfg: NeoXConfig) -> Layout:
    """The layout the config asks for."""
    d, p, t = cfg.derived, cfg.parallel, cfg.training
    z = cfg.optimizer.zero_optimization
    return Layout(
        tp=p.model_parallel_size, pp=d.pipe_stages, dp=d.data_parallel_size, micro_batch=d.micro_batch_size,
        grad_accum=d.gradient_accumulation_steps, zero_stage=d.zero_stage, checkpoint=t.checkpoint_activations,
        checkpoint_num_layers=t.checkpoint_num_layers, sequence_parallel=p.sequence_parallel and p.model_parallel_size > 1,
        partition_activations=t.partition_activations, precision=d.precision,
        reduce_bucket=z.reduce_bucket_size, overlap_comm=z.overlap_comm,
        contiguous_gradients=z.contiguous_gradients,
    )


def stage_parameters(shape: ModelShape, tp: int, pp: int) -> list[int]:
    """Parameters one tensor-parallel rank of each pipeline stage holds. The vocabulary is padded
    to a multiple of make_vocab_size_divisible_by x TP, so the embedding grows with TP."""
    extra_rows = shape.padded_vocab(tp) - shape.padded_vocab_at_config

    def rank(split: tuple[int, int], vocab_rows: bool = False) -> int:
        sharded = split[0] + (extra_rows * shape.hidden if vocab_rows else 0)
        return sharded // tp + split[1]

    stages = []
    for s, layers in enumerate(stage_layer_ranges(shape.num_layers, pp)):
        n = len(layers) * rank(shape.layer_params)
        if s == 0:
            n += rank(shape.embed_params, vocab_rows=True)
        if s == pp - 1:
            n += rank(shape.norm_params)
            # Tied: one stage holds both ends; with pp > 1 the last stage keeps its own copy.
            if pp > 1 or not shape.tied:
                n += rank(shape.out_params, vocab_rows=True)
        stages.append(n)
    return stages


def layer_activation_bytes(shape: ModelShape, lay: Layout) -> int:
    """Bytes one transformer layer keeps for backward, per micro-batch and TP rank, without
    checkpointing: Korthikanti et al. (2022)'s count with an SDPA/flash kernel (no seq x seq
    scores), generalised to grouped-query attention and gated MLPs and matched to the tensors this
    framework's layer actually keeps (tests/planning measures them).

    Per token, in elements (h hidden, kv = key/value heads x head dim, f = MLP width):
    replicated on every TP rank (split by sequence parallelism): the norms' inputs and outputs,
    4h, or 3h with the parallel residual (both norms read the same x); RMSNorm keeps one more h
    each (torch's rms_norm saves its normalised input); one byte per element of each of the two
    hidden-dropout masks. Split by TP: attention keeps the fused q/k/v output (h + 2kv), with
    rotary also the rotated q and k and the contiguous v SDPA makes (h + kv) and the attention
    output and its [b, s, h] copy (2h); without rotary the q/k/v views go to SDPA directly and only
    the output copy (h) is kept. The MLP keeps the activation's input and output (2f), gated both
    halves, the gate's activation and the product (4f).
    """
    h, f, kv = shape.hidden, shape.ffn, shape.kv_hidden
    elem = 2 if lay.half else 4
    norms = (3 if shape.parallel_residual else 4) * h + (2 * h if shape.norm == "rmsnorm" else 0)
    repl = norms * elem + (2 * h if shape.hidden_dropout else 0)
    attention = (h + 2 * kv) + ((h + kv) + 2 * h if shape.rotary else h)
    sharded = (attention + (4 * f if shape.gated else 2 * f)) * elem
    tokens = shape.seq * lay.micro_batch
    sp = lay.tp if lay.sequence_parallel else 1
    return tokens * (repl // sp + sharded // lay.tp)


def backward_transient_bytes(shape: ModelShape, lay: Layout) -> int:
    """Gradients in flight inside one layer's backward (the MLP-wide gradient and a hidden-wide
    one), per micro-batch and TP rank."""
    elem = 2 if lay.half else 4
    return shape.seq * lay.micro_batch * (shape.ffn // lay.tp + shape.hidden) * elem


def logits_bytes(shape: ModelShape, lay: Layout) -> int:
    """The last stage's output end for one micro-batch: at the start of the loss's backward three
    fp32 vocabulary-wide tensors are live (the log-softmax kept for backward, its gradient and the
    logits' gradient), plus the final norm's input and output."""
    tokens = shape.seq * lay.micro_batch
    elem = 2 if lay.half else 4
    return tokens * (shape.padded_vocab(lay.tp) // lay.tp * 12 + 2 * shape.hidden * elem)


def pipe_buffer_bytes(shape: ModelShape, lay: Layout, stage: int) -> int:
    """What DeepSpeed's pipeline engine keeps referenced between and during steps on one stage
    (measured in tests/planning on two stages): it has max(2, min(p - i, m)) pipe buffers. A stage
    that receives activations keeps its receive buffer and, per pipe buffer, the input (which
    requires grad) and its gradient; one that sends activations keeps the buffer the returning
    gradient arrives in; these are full [b, s, h] tensors (the engine sends them unsplit). The
    last stage keeps each buffer's output, the logits [b, s, V/t], after the loss's backward."""
    if lay.pp == 1:
        return 0
    elem = 2 if lay.half else 4
    buffers = max(2, min(lay.pp - stage, lay.grad_accum))
    activation = shape.seq * lay.micro_batch * shape.hidden * elem
    n = 0
    if stage > 0:
        n += (1 + 2 * buffers) * activation
    if stage < lay.pp - 1:
        n += activation
    else:
        n += buffers * shape.seq * lay.micro_batch * (shape.padded_vocab(lay.tp) // lay.tp) * elem
    return n


@dataclass(frozen=True)
class MemoryPlan:
    stage: int  # the heaviest stage
    stage_parameters: list[int]
    weights: int
    gradients: int
    optimizer: int
    activations: int  # kept for backward by the micro-batches in flight
    activations_no_ckpt: int  # the same without checkpointing
    working: int  # backward's working set: the recomputed chunk and the gradients in flight
    logits: int  # logits and loss (last stage)
    buckets: int
    pipe_buffers: int  # DeepSpeed's pipeline engine's buffers, alive between steps
    # Whether the buckets are live during backward (DeepSpeed's gradient hooks fill them) or only
    # in the reduction after the last backward, when activations and logits are freed.
    buckets_in_backward: bool = True

    @property
    def peak_activity(self) -> int:
        """The loss's backward comes before any layer's, and frees the logits first: the larger of
        the two is what is live at once."""
        return max(self.logits, self.working)

    @property
    def total(self) -> int:
        state = self.weights + self.gradients + self.optimizer + self.pipe_buffers
        backward = self.activations + self.peak_activity
        if self.buckets_in_backward:
            return state + backward + self.buckets
        return state + max(backward, self.buckets)


def _stage_memory(shape: ModelShape, lay: Layout, stage: int, params: int, layers: int) -> MemoryPlan:
    wbytes = 2 if lay.half else 4
    # fp32 master copy + Adam m and v in mixed precision; m and v alone in fp32 without ZeRO (torch's
    # Adam updates the model's own weights). ZeRO's optimizer clones its partition of the weights
    # into an fp32 master copy in fp32 too (DeepSpeed's single_partition_of_fp32_groups), so 12.
    obytes = 12 if lay.half or lay.zero_stage >= 1 else 8
    dp = lay.dp
    weights = params * wbytes // (dp if lay.zero_stage >= 3 else 1)
    grads = params * wbytes // (dp if lay.zero_stage >= 2 else 1)
    optim = params * obytes // (dp if lay.zero_stage >= 1 else 1)
    # 1F1B: stage i starts pp - i micro-batches before its first backward.
    in_flight = min(lay.pp - stage, lay.grad_accum)
    full = layer_activation_bytes(shape, lay)
    no_ckpt = full * layers * in_flight
    # Checkpointing keeps each chunk's input (split over TP by partition_activations or sequence
    # parallelism); backward recomputes one chunk of one micro-batch at a time.
    split = lay.tp if (lay.partition_activations or lay.sequence_parallel) else 1
    chunk_input = shape.seq * lay.micro_batch * shape.hidden * wbytes // split
    c = max(1, lay.checkpoint_num_layers)
    chunks = -(-layers // c)
    ckpt = chunk_input * chunks * in_flight
    working = backward_transient_bytes(shape, lay) + (full * min(c, layers) if lay.checkpoint else 0)
    logits = logits_bytes(shape, lay) if stage == lay.pp - 1 else 0
    # DeepSpeed reduces gradients over data parallelism through a bucket of reduce_bucket_size
    # elements, two with overlap_comm (one fills while the other is reduced). ZeRO 2, overlap_comm
    # or contiguous_gradients register gradient hooks that fill the bucket during backward; ZeRO-1
    # without them reduces after the last backward, flattening each bucket's gradients into a
    # temporary while no activation is live (measured: tests/planning, DP 2 with ZeRO-1).
    buckets = 0
    if dp > 1 and lay.zero_stage >= 1:
        buckets = min(lay.reduce_bucket, params) * wbytes * (2 if lay.overlap_comm else 1)
    in_backward = lay.zero_stage >= 2 or lay.overlap_comm or lay.contiguous_gradients
    return MemoryPlan(
        stage=stage, stage_parameters=[], weights=weights, gradients=grads, optimizer=optim,
        activations=ckpt if lay.checkpoint else no_ckpt, activations_no_ckpt=no_ckpt, working=working,
        logits=logits, buckets=buckets, pipe_buffers=pipe_buffer_bytes(shape, lay, stage),
        buckets_in_backward=in_backward,
    )


def stage_plans(shape: ModelShape, lay: Layout) -> list[MemoryPlan]:
    """Bytes per device of every pipeline stage, in stage order."""
    params = stage_parameters(shape, lay.tp, lay.pp)
    ranges = stage_layer_ranges(shape.num_layers, lay.pp)
    return [replace(_stage_memory(shape, lay, s, params[s], len(ranges[s])), stage_parameters=params)
            for s in range(lay.pp)]


def memory_plan(shape: ModelShape, lay: Layout) -> MemoryPlan:
    """Bytes per device for the heaviest pipeline stage: the first holds the most micro-batches'
    activations, the last the output layer and the logits; whichever totals more is reported."""
    return max(stage_plans(shape, lay), key=lambda p: p.total)


def plan_config(cfg: NeoXConfig) -> tuple[ModelShape, Layout, MemoryPlan]:
    """The memory plan of the layout a config asks for."""
    shape, lay = model_shape(cfg), layout_of(cfg)
    return shape, lay, memory_plan(shape, lay)
