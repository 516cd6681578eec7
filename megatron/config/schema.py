"""Typed configuration groups.

YAML files use GPT-NeoX's flat key names (``num_layers``, ``train_micro_batch_size_per_gpu``,
``zero_optimization``...). Each flat key belongs to exactly one group below; the loader routes it
there. Every field carries its documentation in ``metadata["doc"]`` (``docs/config.md`` is
generated from these, and a test fails when a field has none).

Nested YAML blocks that GPT-NeoX passes straight to DeepSpeed (``optimizer``, ``fp16``, ``bf16``,
``zero_optimization``) are typed dataclasses too (blocks.py), so a typo inside them is caught as well.
A ``Literal`` type lists GPT-NeoX's choices; the loader refuses any other value. Choices GPT-NeoX has
and this framework does not implement, and GPT-NeoX's keys for features absent here, are kept in one
table, neox_only.py. Defaults are GPT-NeoX's; docs/neox_compat.md lists the few that differ and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron.config.blocks import BF16Config, FP16Config, OptimizerSpec, ZeroConfig, doc, sub
from megatron.config.neox_only import NeoXOnlyConfig

INIT_METHODS = Literal["normal", "scaled_normal", "orthogonal", "scaled_orthogonal", "xavier_uniform",
                       "xavier_normal", "wang_init", "small_init", "single_residual_scaled_normal"]


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = doc(2, "Number of transformer layers.")
    hidden_size: int = doc(128, "Width of the residual stream.")
    num_attention_heads: int = doc(4, "Attention heads; hidden_size must divide by it.")
    intermediate_size: int | None = doc(
        None, "MLP size before GPT-NeoX's sizing rule: with a gated activation two thirds of it, halved per "
        "half and rounded up to mlp_multiple_of, is each half's width (Llama-7B: 32768 -> 11008); otherwise "
        "the width, rounded up to mlp_multiple_of. Unset: expansion_factor x hidden_size, else 4 x hidden_size.")
    expansion_factor: float | None = doc(None, "MLP size as a multiple of hidden_size when intermediate_size is unset.")
    mlp_multiple_of: int = doc(1, "The MLP width is rounded up to a multiple of this (Llama: 256).")
    num_kv_heads: int | None = doc(
        None, "Key/value heads (grouped-query attention); unset: num_attention_heads. Each tensor-parallel "
        "rank holds num_kv_heads / model_parallel_size of them.")
    use_bias_in_norms: bool = doc(True, "False: norms have a scale and no bias (Llama).")
    use_bias_in_attn_linear: bool = doc(True, "False: query_key_value and attention.dense have no bias (Llama).")
    use_bias_in_mlp: bool = doc(True, "False: the MLP's linears have no bias (Llama).")
    attention_config: list | None = doc(
        None, "GPT-NeoX's per-layer attention types, e.g. [[[\"global\"], 44]] or [[[\"flash\"], 16]]: 'global' "
        "and 'flash' both run PyTorch's fused scaled_dot_product_attention; other types are not implemented.")
    seq_length: int = doc(128, "Training sequence length in tokens.")
    max_position_embeddings: int | None = doc(None, "Longest supported sequence; seq_length when unset.")
    vocab_size: int | None = doc(
        None,
        "Tokenizer entries before padding. Read from the tokenizer when unset; set it so that "
        "--dry-run can plan without the tokenizer file (launch checks it against the tokenizer).",
    )
    make_vocab_size_divisible_by: int = doc(
        128, "The embedding is padded to a multiple of this x model_parallel_size."
    )
    norm: Literal["layernorm", "rmsnorm", "non_parametric_layernorm", "scalenorm", "te_rmsnorm", "te_layernorm"] = doc(
        "layernorm", "'layernorm' or 'rmsnorm'; GPT-NeoX's other norms are refused (docs/neox_compat.md).")
    layernorm_epsilon: float = doc(1e-5, "Epsilon of layernorm.")
    rms_norm_epsilon: float = doc(1e-8, "Epsilon of rmsnorm.")
    pos_emb: Literal["learned", "rotary", "sinusoidal", "rpe", "alibi", "none"] = doc(
        "learned", "'learned' (GPT-NeoX's default), 'rotary' (every published GPT-NeoX model) or 'none'; "
        "'sinusoidal', 'rpe' and 'alibi' are refused.")
    rotary_pct: float = doc(1.0, "Fraction of each head's dims that rotary rotates (20B: 0.25).")
    rotary_emb_base: int = doc(10000, "Base of the rotary frequencies.")
    no_weight_tying: bool = doc(False, "True: separate input and output embeddings (20B).")
    gpt_j_residual: bool = doc(
        False, "True: parallel residual x + attn(ln1(x)) + mlp(ln2(x)); False: sequential."
    )
    activation: Literal["gelu", "geglu", "relu", "softsign", "swish", "mish", "silu", "reglu", "swiglu",
                        "bilinear", "glu"] = doc(
        "gelu", "MLP activation: 'gelu' (exact unless bias_gelu_fusion), 'relu', 'softsign', 'swish', 'mish', "
        "'silu', or a gated one: 'swiglu' (Llama), 'geglu', 'reglu', 'bilinear', 'glu'.")
    bias_gelu_fusion: bool = doc(False, "Fused bias+GELU in GPT-NeoX, which uses the tanh GELU.")
    init_method: INIT_METHODS = doc(
        "normal", "Init of most weights: 'normal', 'scaled_normal', 'small_init', 'wang_init'; GPT-NeoX's "
        "orthogonal and xavier inits are refused."
    )
    output_layer_init_method: INIT_METHODS = doc(
        "scaled_normal", "Init of attention.dense and dense_4h_to_h (same choices as init_method)."
    )
    init_method_std: float = doc(0.02, "Std of 'normal' and base of 'scaled_normal'.")
    hidden_dropout: float = doc(0.0, "Dropout after attention and MLP outputs.")
    attention_dropout: float = doc(0.0, "Dropout on attention probabilities.")
    output_layer_parallelism: Literal["column"] = doc("column", "How the output layer is split over TP ranks.")
    scaled_upper_triang_masked_softmax_fusion: bool = doc(
        False, "Accepted for GPT-NeoX configs; attention always uses PyTorch's fused SDPA."
    )
    rope_fusion: bool = doc(False, "Accepted for GPT-NeoX configs; rotary is computed in PyTorch.")
    layernorm_fusion: bool = doc(False, "Accepted for GPT-NeoX configs; PyTorch's layer_norm is fused.")


@dataclass(frozen=True)
class ParallelConfig:
    model_parallel_size: int = doc(1, "Tensor-parallel degree (ranks that split each layer).")
    pipe_parallel_size: int = doc(
        0,
        "Pipeline stages. >= 1 trains through DeepSpeed's pipeline engine (checkpoints in the "
        "per-layer layout, as GPT-NeoX; 1 is one stage in that engine); 0 uses the plain engine "
        "(needed for ZeRO 2/3).",
    )
    pipe_partition_method: str = doc(
        "type:transformer|mlp", "How layers are spread over stages (DeepSpeed partition_method): "
        "'type:REGEX' balances layers whose class name matches, 'parameters' balances parameters, 'uniform' counts layers."
    )
    sequence_parallel: bool = doc(False, "Shard norm/dropout regions along the sequence (TP > 1).")


@dataclass(frozen=True)
class OptimizerConfig:
    optimizer: OptimizerSpec = sub(OptimizerSpec, "GPT-NeoX's optimizer block: {type, params}.")
    weight_decay: float = doc(0.1, "Decoupled weight decay; never applied to biases and norms.")
    gradient_clipping: float = doc(1.0, "Global grad-norm clip; 0 disables.")
    zero_optimization: ZeroConfig = sub(ZeroConfig, "DeepSpeed ZeRO block.")
    fp16: FP16Config = sub(FP16Config, "fp16 block (DeepSpeed's names).")
    bf16: BF16Config = sub(BF16Config, "bf16 block.")
    precision: Literal["fp16", "fp32", "bfloat16"] | None = doc(
        None, "'fp32', 'fp16' or 'bfloat16'. Set alone, 'fp16' or 'bfloat16' turns that block on (GPT-NeoX's rule); "
        "unset: derived from the fp16/bf16 blocks.")
    fp32_allreduce: bool = doc(
        False, "Reduce gradients across data-parallel ranks in fp32 (DeepSpeed's communication_data_type) "
        "when training in fp16/bf16.")


@dataclass(frozen=True)
class LRConfig:
    lr_decay_style: Literal["constant", "linear", "cosine", "exponential"] = doc(
        "linear", "'linear', 'cosine' or 'constant' after warmup; 'exponential' is refused.")
    lr_decay_iters: int | None = doc(None, "Iterations over which lr decays to min_lr; train_iters when unset.")
    lr_decay_fraction: float | None = doc(
        None, "lr_decay_iters as a fraction of train_iters (GPT-NeoX); set this or lr_decay_iters, not both.")
    min_lr: float = doc(0.0, "Floor of the decayed learning rate.")
    warmup: float = doc(0.01, "Warmup as a fraction of lr_decay_iters (linear from 0).")
    override_lr_scheduler: bool = doc(
        False, "On resume, follow this config's learning-rate schedule (lr, min_lr, warmup, lr_decay_iters, "
        "lr_decay_style) silently. With neither this nor use_checkpoint_lr_scheduler set, the config is "
        "followed too, with one line naming each value that differs from the checkpoint's.")
    use_checkpoint_lr_scheduler: bool = doc(
        False, "On resume, take lr, min_lr, warmup, lr_decay_iters and lr_decay_style from the checkpoint "
        "instead of this config.")


@dataclass(frozen=True)
class DataConfig:
    data_path: str | None = doc(None, "Prefix of a preprocessed dataset (PREFIX.bin/.idx), split by `split`.")
    train_data_paths: list | None = doc(None, "Training prefixes (instead of data_path).")
    valid_data_paths: list | None = doc(None, "Validation prefixes.")
    test_data_paths: list | None = doc(None, "Test prefixes.")
    train_data_weights: list | None = doc(None, "Blend weights of train_data_paths.")
    weight_by_num_documents: bool = doc(
        False, "Blend weights from each dataset's document count (replacing *_data_weights), tempered "
        "by weighted_sampler_alpha.")
    weighted_sampler_alpha: float = doc(
        1.0, "With weight_by_num_documents: weights proportional to (documents / total) ** alpha, renormalised; "
        "alpha < 1 favours the small datasets.")
    valid_data_weights: list | None = doc(None, "Blend weights of valid_data_paths.")
    test_data_weights: list | None = doc(None, "Blend weights of test_data_paths.")
    split: str = doc("969, 30, 1", "Train/valid/test proportions of data_path's documents.")
    data_impl: Literal["infer", "mmap", "cached", "stream"] = doc(
        "infer",
        "'infer' (GPT-NeoX's default) and 'mmap': data_path / *_data_paths are preprocessed PREFIX.bin/.idx datasets. 'stream': "
        "train/valid/test_data_paths are raw .jsonl/.jsonl.zst/.jsonl.gz/.txt files or globs, "
        "tokenized on the fly by num_workers processes per rank (0: in the training process).",
    )
    stream_text_key: str = doc("text", "JSON key holding the document text when data_impl is 'stream'.")
    stream_shuffle_files: bool = doc(
        True, "data_impl 'stream': read training files in a per-epoch order seeded by seed "
        "(documents stay in file order); False: as listed.")
    stream_cache_dir: str | None = doc(
        None, "data_impl 'stream': where per-file token counts are kept so a resumed run skips "
        "whole files unread; default: beside the first training file.")
    tokenizer_type: Literal["GPT2BPETokenizer", "HFTokenizer", "HFGPT2Tokenizer", "SPMTokenizer", "CharLevelTokenizer",
                            "TiktokenTokenizer"] = doc(
        "GPT2BPETokenizer", "'GPT2BPETokenizer', 'HFTokenizer', 'SPMTokenizer' (SentencePiece; Llama) or "
        "'CharLevelTokenizer'; the others are refused.")
    vocab_file: str | None = doc(
        None, "Tokenizer JSON (HFTokenizer), vocab.json (GPT2BPETokenizer) or the SentencePiece .model file "
        "(SPMTokenizer).")
    merge_file: str | None = doc(None, "merges.txt for GPT2BPETokenizer.")
    num_workers: int = doc(
        2, "data_impl 'stream': tokenizer worker processes per rank (0: in the training process). "
        "GPT-NeoX's loader workers; preprocessed data is read in the training process here.")


@dataclass(frozen=True)
class TrainingConfig:
    train_iters: int | None = doc(None, "Optimizer steps to train; derived from train_tokens when unset.")
    train_tokens: int | None = doc(None, "Token budget; train_iters = ceil(tokens / (batch x seq)).")
    train_batch_size: int | None = doc(None, "Global batch = micro x grad-accum x data-parallel size.")
    train_micro_batch_size_per_gpu: int | None = doc(None, "Sequences per rank per micro-batch.")
    gradient_accumulation_steps: int | None = doc(None, "Micro-batches per optimizer step.")
    seed: int = doc(1234, "Seed of weights, dropout and data order.")
    eod_mask_loss: bool = doc(False, "Leave positions whose input token is the end-of-document token out of the loss "
        "(GPT-NeoX's meaning: the prediction made after each document's last token).")
    eval_interval: int = doc(1000, "Evaluate on the validation split every this many iterations.")
    eval_iters: int = doc(100, "Batches per evaluation.")
    exit_interval: int | None = doc(
        None, "Checkpoint and exit at the next iteration divisible by this (GPT-NeoX's meaning): "
        "rerunning the same config with `load` goes on to the next multiple."
    )
    checkpoint_activations: bool = doc(False, "Recompute layer activations in the backward pass.")
    checkpoint_num_layers: int = doc(1, "Layers per activation-checkpoint chunk.")
    partition_activations: bool = doc(
        False, "Split checkpointed activations across the tensor-parallel ranks (DeepSpeed's activation "
        "partitioning)."
    )
    synchronize_each_layer: bool = doc(
        False, "Accepted; changes nothing here (GPT-NeoX waits for the GPU after every layer, a debugging aid).")
    distributed_backend: Literal["nccl", "gloo"] | None = doc(
        None, "'nccl' or 'gloo'; unset: nccl on GPUs, gloo on a CPU-only machine (GPT-NeoX: always nccl).")
    deterministic: bool = doc(False, "Ask PyTorch for deterministic kernels.")
    compile_loss: bool = doc(
        False, "torch.compile the fp32 cross-entropy (model_parallel_size 1): ~10% of a CPU step at a "
        "50k vocabulary; the first step compiles for 10-45 s; eager if compilation fails.")


@dataclass(frozen=True)
class CheckpointConfig:
    save: str | None = doc(None, "Directory checkpoints are written to.")
    load: str | None = doc(None, "Directory to resume from (its `latest` tag).")
    checkpoint_factor: int | float | None = doc(
        None, "checkpoint_scale linear: save every this many iterations (a whole number); log: at every power "
        "of this below train_iters (1, f, f^2, ...). The last iteration always saves.")
    checkpoint_scale: Literal["linear", "log"] = doc("linear", "How checkpoint_factor spaces the saves.")
    keep_last_n_checkpoints: int | None = doc(None, "Delete older checkpoints beyond this count.")
    extra_save_iters: list | None = doc(None, "Iterations saved besides every checkpoint_factor (Pythia: 1, 2, 4 ... 512).")
    no_save_optim: bool = doc(False, "Save weights without optimizer state.")
    no_save_rng: bool = doc(False, "Save without the random number generator states.")
    no_load_rng: bool = doc(False, "Resume without restoring the random number generator states.")
    checkpoint_validation_with_forward_pass: bool = doc(
        False, "Accepted for GPT-NeoX configs; every save is checked here by its atomic rename instead.")
    finetune: bool = doc(
        False, "Load weights only and start at iteration 0; the checkpoint may have any tensor/pipeline "
        "layout, ours or GPT-NeoX's (docs/checkpoints.md).")
    no_load_optim: bool = doc(False, "Resume weights but not optimizer state.")
    allow_unsafe_checkpoint_load: bool = doc(
        False, "Checkpoint files are read as data (tensors, NumPy arrays, plain values); a file that needs "
        "other Python objects unpickled is refused unless this is true (unpickling can run code).")


@dataclass(frozen=True)
class LoggingConfig:
    log_dir: str | None = doc(None, "Directory of metrics.jsonl (one JSON record per logged iteration).")
    tensorboard_dir: str | None = doc(None, "TensorBoard event directory; off when unset.")
    use_wandb: bool = doc(False, "Log to Weights & Biases (WANDB_MODE=offline works without account).")
    wandb_project: str = doc("neox", "wandb project.")
    wandb_group: str | None = doc(None, "wandb group (run name prefix).")
    wandb_team: str | None = doc(None, "wandb entity (team or user) the run is logged under.")
    wandb_host: str = doc("https://api.wandb.ai", "wandb server URL.")
    wandb_run_name: str | None = doc(None, "wandb run name; default: the group with a random suffix.")
    log_interval: int = doc(100, "Iterations between log lines.")
    steps_per_print: int = doc(10, "DeepSpeed's own print interval.")
    wall_clock_breakdown: bool = doc(False, "DeepSpeed timing breakdown in its logs.")


@dataclass(frozen=True)
class LauncherConfig:
    """How deepy.py starts the ranks (GPT-NeoX's runner keys; docs/launching.md)."""

    num_gpus: int | None = doc(
        None, "Processes per node; default: one per GPU of this machine, or TP x PP on a CPU-only one (gloo). "
        "Inside a Slurm allocation the allocation's tasks per node.")
    num_nodes: int = doc(1, "Nodes. Inside a Slurm allocation (launcher: slurm) the allocation's node count.")
    master_port: int | None = doc(
        None, "Rendezvous port. Unset: on one node a free port is chosen at launch, so two runs side by side "
        "do not collide; a Slurm job derives one from its job id; otherwise 29500 (GPT-NeoX's default).")
    master_addr: str | None = doc(
        None, "Rendezvous host. Unset: this machine on one node, the first host of the Slurm allocation, "
        "or the first host of the hostfile.")
    hostfile: str | None = doc(None, "DeepSpeed hostfile ('host slots=N' lines) for pdsh/openmpi/mvapich runs "
                                     "across nodes; Slurm needs none.")
    include: str | None = doc(None, "Hosts to use, DeepSpeed's syntax ('host1@host2'); with Slurm: srun --nodelist.")
    exclude: str | None = doc(None, "Hosts to leave out, DeepSpeed's syntax; with Slurm: srun --exclude.")
    launcher: Literal["pdsh", "openmpi", "mvapich", "slurm"] = doc(
        "pdsh", "Multi-node launcher: 'pdsh' (DeepSpeed's runner over ssh), 'slurm' (srun, no ssh), "
        "'openmpi' (mpirun) or 'mvapich' (mpirun of MVAPICH).")
    deepspeed_slurm: bool = doc(False, "GPT-NeoX's switch for Slurm: the ranks take RANK/WORLD_SIZE from srun; "
                                       "same as launcher: slurm.")
    deepspeed_mpi: bool = doc(False, "GPT-NeoX's switch for MPI: the ranks take RANK/WORLD_SIZE from mpirun "
                                     "(OMPI_COMM_WORLD_*); launcher: openmpi unless mvapich is named.")
    no_ssh_check: bool = doc(False, "Accepted for GPT-NeoX configs; pdsh only (slurm and MPI need no ssh).")
    comment: str | None = doc(None, "Slurm job comment passed to srun --comment.")
    account: str | None = doc(None, "Slurm account passed to srun --account.")
    forward_env: list = doc(
        [], "Extra environment variable names (shell patterns allowed) every rank must get, besides NCCL_*, "
        "WANDB_*, PYTHON*, CUDA_*, OMP_*, HF_*, TORCH_* and a few more that are always forwarded.")
    distributed_timeout_minutes: float = doc(
        30.0, "How long a collective waits for a rank that died or hangs before the survivors fail "
        "(torch's default); the job then exits non-zero naming the ranks. Keep it above the longest "
        "checkpoint save.")
    preemption_grace_seconds: float = doc(
        600.0, "After a SIGTERM/SIGUSR1/SIGINT to deepy.py the workers finish the step, save and exit; those "
        "still running this many seconds later are killed. Keep it below the scheduler's warning time.")


@dataclass(frozen=True)
class GenerationConfig:
    """What generate.py does (GPT-NeoX's text generation keys and defaults)."""

    text_gen_type: Literal["unconditional", "input-file", "interactive"] | None = doc(
        None, "generate.py's mode: 'unconditional' (num_samples samples after an end-of-text token), "
        "'input-file' (one completion per prompt of sample_input_file) or 'interactive' (prompts "
        "typed at rank 0's terminal; 'stop' or end of input quits).")
    sample_input_file: str | None = doc(
        None, "input-file mode: the prompts, separated by prompt_end; blank prompts are skipped.")
    sample_output_file: str = doc(
        "samples.txt", "JSON lines written by generate.py, in prompt order: context (the prompt), text "
        "(the completion, without the end-of-text token), length (its tokens), finished (true when it "
        "ended with the end-of-text token).")
    maximum_tokens: int = doc(
        64, "New tokens per completion at most; fewer when the longest prompt of a batch plus them "
        "exceeds max_position_embeddings.")
    prompt_end: str = doc("\n", "Separator of the prompts in sample_input_file (one prompt a line by default).")
    temperature: float = doc(0.0, "0: greedy (the most likely token); otherwise logits are divided by it, then sampled.")
    top_k: int = doc(0, "Sample among the top_k most likely tokens only; 0: off.")
    top_p: float = doc(
        0.0, "Nucleus sampling: only the most likely tokens until their probability reaches top_p; 0: off.")
    num_samples: int = doc(1, "unconditional mode: how many samples.")
    recompute: bool = doc(
        False, "Run the whole sequence through the model at every step instead of using the key/value "
        "cache (same tokens, slower; GPT-NeoX's option).")


@dataclass(frozen=True)
class EvaluationConfig:
    """lm-evaluation-harness tasks: what eval.py evaluates, and the training loop at eval_interval."""

    eval_tasks: list[str] | None = doc(
        None, "lm-evaluation-harness tasks (lambada_openai, piqa, sciq, arc_easy, arc_challenge, hellaswag, "
        "winogrande) that eval.py evaluates; during training they are also evaluated every eval_interval "
        "iterations. `python deepy.py eval.py CONFIG.yml --eval_tasks piqa ...` sets them on the command line.")
    eval_results_prefix: str = doc(
        "", "eval.py writes PREFIX_eval_results_DATE.json (the harness's results, GPT-NeoX's name) and "
        "PREFIX_eval_samples_DATE.jsonl (every request's document, arguments and response); empty: no PREFIX_.")
    eval_tasks_limit: int | None = doc(
        None, "Documents per task, the first ones (the harness's --limit); unset: all. Keeps the evaluation "
        "during training cheap.")
    eval_tasks_dir: str = doc(
        "data/eval_tasks", "Where `python prepare_data.py eval_tasks --data-dir DIR` put the task documents "
        "(DIR/eval_tasks); nothing is downloaded at run time.")
    eval_tasks_batch_size: int | None = doc(
        None, "Sequences per forward pass and replica when scoring requests; unset: train_micro_batch_size_per_gpu.")


GATED_ACTIVATIONS = ("swiglu", "geglu", "reglu", "bilinear", "glu")
"""Activations whose MLP input projection holds two halves, act(gate) x value (GPT-NeoX's `linear1`)."""


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "optimizer": OptimizerConfig,
    "lr": LRConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "launcher": LauncherConfig,
    "generation": GenerationConfig,
    "evaluation": EvaluationConfig,
    "neox": NeoXOnlyConfig,
}
