"""Published, measured training runs the planner is validated against, each with its source.

Every figure below is the paper's; where a paper does not state a setting the planner needs,
the assumption is written next to it. TFLOPS are per GPU as the papers count them: model FLOPs
plus the recomputed forward of activation checkpointing (Megatron-LM's 96 B s l h^2 (1 + s/6h +
V/16lh) per iteration, which GPT-NeoX's logging also uses).

Settings this framework lacks enter the step-time model through `Kernels` and `Layout`:
- attention without a flash kernel (all three papers predate it): the seq x seq scores are
  materialised, 5 a s^2 b bytes per layer (Korthikanti et al. 2022), charged as elementwise traffic;
- Megatron-LM's interleaved 1F1B: `virtual_stages` v divides the bubble by v and multiplies the
  pipeline sends by v;
- Megatron-LM's scatter/gather of pipeline activations: each TP rank sends 1/t of the activation;
- Megatron-LM's non-blocking pipeline sends (`blocking_pipeline=False`) against DeepSpeed's
  lockstep engine (GPT-NeoX-20B, MT-NLG), whose fill and drain cost twice (p - 1) micro-batches;
- Megatron-LM 2021 all-reduced gradients after the backward (no overlap) and did not shard the
  optimizer state (ZeRO 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron.config import NeoXConfig, load_config
from megatron.planning.cluster import Cluster, load_cluster
from megatron.planning.step_time import Kernels

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "configs" / "clusters"


@dataclass(frozen=True)
class Run:
    name: str
    source: str
    tflops: float  # published, per GPU
    values: dict  # the config (GPT-NeoX keys)
    world: int
    cluster: Cluster
    kernels: Kernels
    layout: dict  # Layout fields the config cannot say (virtual stages, ZeRO 0 with fp16)


def config(run: Run, tmp: Path) -> NeoXConfig:
    path = tmp / f"{run.name.replace(' ', '_')}.yml"
    path.write_text(yaml.safe_dump(run.values))
    return load_config([str(path)], world_size=run.world, num_nodes=run.world // run.cluster.gpus_per_node,
                       require_files=False)


_A100_80 = load_cluster(CLUSTERS / "a100-80gb.yml")
_A100_40 = load_cluster(CLUSTERS / "a100-40gb.yml")

# GPT-NeoX-20B: Black et al. 2022, "GPT-NeoX-20B: An Open-Source Autoregressive Language Model"
# (arXiv 2204.06745), section 3 (training) and its hardware description: 12 nodes of 8
# A100-SXM4-40GB, the GPUs reaching the InfiniBand fabric through four ConnectX-6 HDR (200 Gb/s)
# HCAs per node, i.e. half the per-GPU bandwidth of a DGX A100; TP 2 x PP 4 x DP 12, micro-batch 4
# x 32 accumulation steps (configs/20B.yml, the released config), ZeRO-1, fp16, checkpointing every
# layer; 117 TFLOPS per GPU.
NEOX_20B = Run(
    "GPT-NeoX-20B", "Black et al. 2022 (arXiv 2204.06745), section 3: 117 TFLOPS per A100-40GB", 117.0,
    yaml.safe_load((ROOT / "configs" / "20B.yml").read_text()), 96,
    dataclasses.replace(_A100_40, inter_node_bandwidth_gbs=12.5),
    Kernels(flash_attention=False, blocking_pipeline=True), {},
)


def _gpt(layers: int, hidden: int, heads: int, tp: int, pp: int, batch: int, micro: int) -> dict:
    """A GPT of the Megatron-LM / MT-NLG papers: learned positions, tied embeddings, 4h GELU MLP,
    sequential residual, sequence 2048, vocabulary 51,200, fp16, checkpointing every layer."""
    return {"num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "seq_length": 2048,
            "vocab_size": 51200, "pos_emb": "learned", "no_weight_tying": False, "model_parallel_size": tp,
            "pipe_parallel_size": pp, "train_batch_size": batch, "train_micro_batch_size_per_gpu": micro,
            "train_iters": 1, "precision": "fp16", "checkpoint_activations": True, "hidden_dropout": 0.1,
            "optimizer": {"type": "Adam", "params": {"lr": 1.0e-4}}}


# MT-NLG 530B: Smith et al. 2022, "Using DeepSpeed and Megatron to Train Megatron-Turing NLG 530B"
# (arXiv 2201.11990), sections 2-3: 105 layers, hidden 20480, 128 heads, sequence 2048, global batch
# 1920, TP 8 x PP 35 on DGX A100 80GB nodes (Selene), DeepSpeed's pipeline engine, micro-batch 1;
# 280 / 350 / 420 nodes (DP 8 / 10 / 12) reached 126 / 121 / 113 TFLOPS per GPU.
MT_NLG = [
    Run(f"MT-NLG 530B on {nodes} nodes", f"Smith et al. 2022 (arXiv 2201.11990), section 3: {tflops} TFLOPS per GPU",
        tflops, _gpt(105, 20480, 128, 8, 35, 1920, 1), nodes * 8, _A100_80,
        Kernels(flash_attention=False, blocking_pipeline=True, overlap_dp=False), {})
    for nodes, tflops in ((280, 126.0), (350, 121.0), (420, 113.0))
]

# Megatron-LM: Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
# Clusters Using Megatron-LM" (arXiv 2104.04473), Table 1 (weak scaling, DGX A100 80GB on Selene,
# vocabulary 51,200, sequence 2048, with activation recomputation). Columns: parameters, heads,
# hidden, layers, TP, PP, GPUs, batch, achieved TFLOPS per GPU. Not stated in the table, assumed:
# micro-batch 4 without a pipeline and 1 with one; interleaved schedule with 2 virtual stages per
# device (3 for the 530B, whose 3 layers per stage cannot split in 2), scatter/gather on.
_MEGATRON_TABLE_1 = [
    ("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137.0),
    ("3.6B", 32, 3072, 30, 2, 1, 64, 512, 138.0),
    ("7.5B", 32, 4096, 36, 4, 1, 128, 512, 142.0),
    ("18.4B", 48, 6144, 40, 8, 1, 256, 1024, 135.0),
    ("39.1B", 64, 8192, 48, 8, 2, 512, 1536, 138.0),
    ("76.1B", 80, 10240, 60, 8, 4, 1024, 1792, 140.0),
    ("145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 148.0),
    ("310.1B", 128, 16384, 96, 8, 16, 1920, 2160, 155.0),
    ("529.6B", 128, 20480, 105, 8, 35, 2520, 2520, 163.0),
    ("1T", 160, 25600, 128, 8, 64, 3072, 3072, 163.0),
]
MEGATRON = [
    Run(f"Megatron-LM {name}", f"Narayanan et al. 2021 (arXiv 2104.04473), Table 1: {tflops} TFLOPS per GPU", tflops,
        _gpt(layers, hidden, heads, tp, pp, batch, 1 if pp > 1 else 4), gpus, _A100_80,
        Kernels(flash_attention=False, scatter_gather=True, blocking_pipeline=False, overlap_dp=False),
        {"zero_stage": 0, "virtual_stages": (3 if layers // pp == 3 else 2) if pp > 1 else 1})
    for name, heads, hidden, layers, tp, pp, gpus, batch, tflops in _MEGATRON_TABLE_1
]

RUNS = [NEOX_20B, *MT_NLG, *MEGATRON]
