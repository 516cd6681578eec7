"""The language-model loss, eager or compiled.

`lm_loss` is the definition: mean next-token cross-entropy computed in fp32. `masked_lm_loss`
is its eod_mask_loss form: labels below 0 (megatron/data/loader.py's IGNORE) are left out and the
mean is over the rest, per micro-batch as in GPT-NeoX. `loss_function` returns what the engines
call, chosen once, optionally through `torch.compile`.

Why compile it: with a 50k vocabulary the logits of a micro-batch are the largest tensor of the
step ([b*s, V]). Eagerly, the fp32 upcast, log-softmax and their gradients each write and read
a full fp32 copy; compiled, the upcast fuses into the reductions that read the logits and the
backward writes the gradient in one pass (benchmarks/README.md: ~10% of a CPU step at h512/L8).
Compilation costs 10-45 s on the first step, so it is opt-in (`compile_loss`), and it applies
at tensor-parallel size 1 only: the vocabulary-parallel loss communicates inside its autograd
function.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Callable

import torch

from megatron.parallel.groups import SINGLE, TensorParallel
from megatron.parallel.layers import vocab_parallel_cross_entropy

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, tp: TensorParallel = SINGLE) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32, over logits split across tensor-parallel ranks."""
    return vocab_parallel_cross_entropy(logits, labels, tp).mean()


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, tp: TensorParallel = SINGLE) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is >= 0."""
    keep = labels >= 0
    # Any valid id stands in for a masked label; its loss is multiplied by 0 (value and gradient).
    losses = vocab_parallel_cross_entropy(logits, labels.clamp(min=0), tp)
    # A micro-batch of masked positions only gives 0, not 0/0 = NaN.
    return (losses * keep).sum() / keep.sum().clamp(min=1)


class CompiledLoss:
    """`lm_loss` through torch.compile, or eager when compilation does not work here.

    Inductor compiles the backward lazily, so a failure could surface inside the engine's
    backward pass. The first call therefore runs a trial forward and backward on a detached
    copy of the logits; if anything in it raises (no C++ compiler, an inductor bug), this
    prints why once and stays eager. Both paths compute the same fp32 math.
    """

    def __init__(self, fn: LossFn = lm_loss) -> None:
        self.eager = fn
        self.compiled: LossFn | None = torch.compile(fn, dynamic=False)
        self.tried: set[bool] = set()  # training (with grad) and eval compile separate graphs

    def _trial(self, logits: torch.Tensor, labels: torch.Tensor, with_grad: bool) -> None:
        self.tried.add(with_grad)
        try:
            probe = logits.detach().requires_grad_(with_grad)
            loss = self.compiled(probe, labels)
            if with_grad:
                loss.backward()
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
            print(f"compile_loss: torch.compile failed ({type(err).__name__}: {str(err)[:200]}); "
                  "using the eager loss", file=sys.stderr, flush=True)
            self.compiled = None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with_grad = torch.is_grad_enabled() and logits.requires_grad
        if self.compiled is not None and with_grad not in self.tried:
            self._trial(logits, labels, with_grad)
        return (self.compiled or self.eager)(logits, labels)


def loss_function(tp: TensorParallel = SINGLE, compile: bool = False, masked: bool = False) -> LossFn:
    """The loss the engines call: `lm_loss` (`masked_lm_loss` for eod_mask_loss) bound to `tp`,
    compiled when asked (TP = 1 only)."""
    fn = masked_lm_loss if masked else lm_loss
    if compile:
        if tp.size != 1:
            raise ValueError("compile_loss applies at model_parallel_size 1 only")
        return CompiledLoss(fn)
    return partial(fn, tp=tp)
