"""Parallelism, in two kinds.

Tensor (and sequence) parallelism is built into the model, Megatron-style: the model's layers
are the tensor-parallel layers of `layers` and take the tensor-parallel group in their
constructors (`groups.TensorParallel`); with one rank they are the plain layers, so there is one
copy of the architecture. `comm` holds their autograd-aware collectives, `random` the
per-rank dropout stream.

Pipeline and data parallelism, devices and backends are applied from outside: `pipeline` hands
the model's layer list to DeepSpeed's pipeline engine, `groups` builds the process groups (and is
DeepSpeed's mpu), `device` picks the device and the communication backend.

The layers, collectives, groups, device and random streams import nothing from megatron.model
(the model depends on them, not the reverse); only `pipeline`, which wraps the model, does.
"""
