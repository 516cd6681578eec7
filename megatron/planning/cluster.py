"""A cluster file: what the planner needs to know about the machines a run will rent.

One YAML mapping per file (configs/clusters/*.yml); every key is required unless marked optional:

    name                      a label for reports
    gpu                       the accelerator's name, for reports
    peak_tflops               dense bf16/fp16 tensor-core peak per device, TFLOP/s (datasheet)
    memory_gib                device memory per device, GiB, as the driver reports it
    hbm_bandwidth_gbs         device memory bandwidth, GB/s
    gpus_per_node             devices per node
    intra_node_bandwidth_gbs  one direction, per device, to the other devices of its node, GB/s
    intra_node_latency_us     one hop inside a node, microseconds
    inter_node_bandwidth_gbs  one direction, per device, to other nodes (its share of the NICs), GB/s
    inter_node_latency_us     one hop between nodes, microseconds
    nodes                     optional: nodes available (what --search lays out on when the config
                              names fewer)
    price_per_gpu_hour        optional: USD per device-hour, for the cost of the run
    matmul_efficiency         optional: the fraction of peak_tflops large matmuls sustain in
                              training; default the planner's calibrated MATMUL_EFFICIENCY, which
                              is for datasheet peaks. Where peak_tflops is itself a measured
                              matmul rate (cpu.yml) it is 1.
    source                    optional: where the figures come from

Bandwidths are decimal GB/s (1e9 bytes), as datasheets state them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron.config import ConfigError
from megatron.config.loader import unknown_key_error


@dataclass(frozen=True)
class Cluster:
    name: str
    gpu: str
    peak_tflops: float
    memory_gib: float
    hbm_bandwidth_gbs: float
    gpus_per_node: int
    intra_node_bandwidth_gbs: float
    intra_node_latency_us: float
    inter_node_bandwidth_gbs: float
    inter_node_latency_us: float
    nodes: int | None = None
    price_per_gpu_hour: float | None = None
    matmul_efficiency: float | None = None
    source: str = ""

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


_OPTIONAL = {"nodes", "price_per_gpu_hour", "matmul_efficiency", "source"}
_TEXT = {"name", "gpu", "source"}
_WHOLE = {"gpus_per_node", "nodes"}


def cluster_from_dict(values: dict, where: str) -> Cluster:
    """Validate one mapping; `where` (the file) opens every error message."""
    fields = {f.name: f for f in dataclasses.fields(Cluster)}
    for key in values:
        if key not in fields:
            raise unknown_key_error(key, sorted(fields), f" in cluster file {where}")
    missing = [k for k in fields if k not in values and k not in _OPTIONAL]
    if missing:
        raise ConfigError(f"cluster file {where}: missing key(s) {', '.join(missing)}")
    clean: dict = {}
    for key, value in values.items():
        if key in _TEXT:
            if not isinstance(value, str):
                raise ConfigError(f"cluster file {where}: {key} must be text, got {value!r}")
        elif value is None and key in _OPTIONAL:
            pass
        elif key in _WHOLE:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"cluster file {where}: {key} must be a whole number >= 1, got {value!r}")
        else:
            # Bandwidths and peaks divide: zero or negative would give infinite or negative times.
            positive = key not in ("intra_node_latency_us", "inter_node_latency_us")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
                rule = "> 0" if positive else ">= 0"
                raise ConfigError(f"cluster file {where}: {key} must be a number {rule}, got {value!r}")
            value = float(value)
        clean[key] = value
    return Cluster(**clean)


def load_cluster(path: str | Path) -> Cluster:
    """Read and validate a cluster file; ConfigError names the file and the key."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"cluster file {path}: not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"cluster file {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"cluster file {path}: must be a mapping of keys to values")
    return cluster_from_dict(values, str(path))
