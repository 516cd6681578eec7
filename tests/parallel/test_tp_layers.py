"""Each tensor-parallel piece against its dense twin, forward and backward, on 2 gloo ranks."""

from __future__ import annotations

import pytest

import tp_workers
from helpers import run_distributed


def test_column_and_row_parallel_linear():
    run_distributed(tp_workers.linear_layers, 2)


def test_vocab_parallel_embedding_and_cross_entropy():
    run_distributed(tp_workers.embedding_and_cross_entropy, 2)


@pytest.mark.parametrize("parallel_residual, sequence_parallel", [(True, False), (False, False), (True, True), (False, True)])
def test_whole_model_loss_and_every_gradient(parallel_residual, sequence_parallel):
    run_distributed(tp_workers.whole_model_gradients, 2, parallel_residual, sequence_parallel)


@pytest.mark.parametrize("parallel_residual", [True, False])
def test_one_all_reduce_per_layer_with_parallel_residual(parallel_residual):
    run_distributed(tp_workers.collectives_per_layer, 2, parallel_residual, {})


def test_dropout_rng_streams():
    run_distributed(tp_workers.dropout_streams, 2)
