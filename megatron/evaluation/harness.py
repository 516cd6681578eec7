"""The lm-evaluation-harness model class over the framework's own model (any TP/PP/DP layout).

The harness gives requests; `TemplateLM` (the harness's base class) tokenizes a context and
continuation exactly as its `hf` backend does, and this class scores the token ids:

- `_loglikelihood_tokens`: the input is context + continuation minus its last token, cut to the
  last `max_length` ids; the log-probabilities of the continuation's tokens are summed in fp32
  over the full vocabulary, and `is_greedy` says whether each was the most likely token. A
  continuation longer than `max_length` is scored in pieces of `max_length` tokens, each after
  all that precedes it (the hf backend refuses such requests).
  Requests are sorted longest first and batched (right padding: a causal model's outputs at
  real positions do not depend on padding after them), then put back in the harness's order.
- `loglikelihood_rolling`: the harness's own disjoint rolling windows of `max_length`, scored the
  same way and summed.
- `generate_until`: greedy (or sampled, as the request's gen_kwargs say) continuation of each
  context, the whole sequence run again at every new token (works the same through a pipeline),
  cut at the first stop string.

Every process runs the harness on all requests (the harness sees one rank); the batches are
split over the data-parallel replicas and every process gets every result (replica.py), so the
metrics are computed identically everywhere and rank 0 reports them.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval import utils as harness_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from megatron.evaluation.replica import Replica
from megatron.generation.sampling import Sampling, sample
from megatron.parallel.comm import gather_last_dim
from megatron.tokenizer import AbstractTokenizer

Scored = tuple[float, bool]


class NeoXLM(TemplateLM):
    def __init__(self, replica: Replica, tokenizer: AbstractTokenizer, vocab_size: int, max_length: int,
                 batch_size: int, seed: int = 1234, progress: bool = True) -> None:
        super().__init__()
        self.replica, self.tok, self.vocab_size = replica, tokenizer, vocab_size
        self._max_length, self.batch_size, self.seed = max_length, batch_size, seed
        # Each rank pads its sequences to a multiple of the tensor-parallel size under sequence parallelism.
        self.multiple = replica.tp.size if replica.tp.sequence_parallel else 1
        self.progress = progress

    # ---------------------------------------------------------------- tokenizer
    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.tokenize(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.detokenize(tokens)

    # ---------------------------------------------------------------- batches
    def _tokens(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        width += -width % self.multiple
        return torch.tensor([r + [self.tok.eod] * (width - len(r)) for r in rows], dtype=torch.long)

    def _score_head(self, rows: list[tuple[list[int], list[int]]]):
        """On the last stage: (sum of log-probs, all greedy) of each row's continuation ids."""
        def head(logits: torch.Tensor) -> list[Scored]:
            out = []
            for i, (inp, cont) in enumerate(rows):
                picked = gather_last_dim(logits[i, len(inp) - len(cont):len(inp)], self.replica.tp).float()
                logprobs = torch.log_softmax(picked, dim=-1)
                target = torch.tensor(cont, device=logprobs.device)
                total = float(logprobs.gather(-1, target.unsqueeze(-1)).sum())
                out.append((total, bool((logprobs.argmax(-1) == target).all())))
            return out
        return head

    def _score_batch(self, batch: list[tuple[list[int], list[int]]]) -> list[Scored]:
        rows = []
        for context, cont in batch:
            # The harness's hf backend: the last max_length ids of context + continuation, minus the last.
            whole = (context + cont)[-(self.max_length + 1):]
            rows.append((whole[:-1], cont))
        return self.replica.run(self._tokens([inp for inp, _ in rows]), self._score_head(rows))

    def _windows(self, context: list[int], cont: list[int]) -> list[tuple[list[int], list[int]]]:
        """A continuation longer than max_length is scored in consecutive pieces of max_length
        tokens, each after everything before it (the hf backend refuses such a request)."""
        tokens, start = context + cont, len(context)
        return [(tokens[:a], tokens[a:a + self.max_length]) for a in range(start, len(tokens), self.max_length)]

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[Scored]:
        pieces, owner = [], []
        for n, (_, context, cont) in enumerate(requests):
            for piece in self._windows(context, cont):
                pieces.append(piece)
                owner.append(n)
        order = sorted(range(len(pieces)), key=lambda i: -min(len(pieces[i][0] + pieces[i][1]), self.max_length + 1))
        pairs = [pieces[i] for i in order]
        batches = [pairs[k:k + self.batch_size] for k in range(0, len(pairs), self.batch_size)]
        bar = tqdm(total=len(batches), desc="scoring", disable=disable_tqdm or not self.progress)

        def score(batch):
            result = self._score_batch(batch)
            bar.update(self.replica.replicas)
            return result

        scored = self.replica.map(batches, score)
        bar.close()
        results: list[Scored] = [(0.0, True)] * len(requests)
        for i, (logprob, greedy) in zip(order, scored):
            total, all_greedy = results[owner[i]]
            results[owner[i]] = (total + logprob, all_greedy and greedy)
        for request, value in zip(requests, results):
            if request[0] is not None:
                self.cache_hook.add_partial("loglikelihood", request[0], value)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for context, cont in map(harness_utils.make_disjoint_window, harness_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------- generation
    def _generate_batch(self, batch: list[tuple[list[int], list[str], int, Sampling]]) -> list[str]:
        rows = [list(ids) for ids, _, _, _ in batch]
        start = [len(r) for r in rows]
        stops, budget, sampling = batch[0][1], batch[0][2], batch[0][3]
        generator = torch.Generator().manual_seed(self.seed)
        done = [False] * len(rows)

        def head(logits: torch.Tensor) -> list[int]:
            last = torch.stack([logits[i, len(r) - 1] for i, r in enumerate(rows)])
            return sample(gather_last_dim(last, self.replica.tp).float().cpu(), self.vocab_size, sampling,
                          generator).tolist()

        for _ in range(budget):
            if all(done) or max(len(r) for r in rows) >= self.max_length:
                break
            for i, token in enumerate(self.replica.run(self._tokens(rows), head)):
                if done[i]:
                    continue
                rows[i].append(token)
                text = self.tok_decode(rows[i][start[i]:])
                done[i] = token == self.eot_token_id or any(s and s in text for s in stops)
        texts = []
        for i, r in enumerate(rows):
            generated = [t for t in r[start[i]:] if t != self.eot_token_id]
            text = self.tok_decode(generated)
            for stop in stops:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Requests with the same settings share batches; each context keeps its last
        max_length - max_gen_toks ids, as the hf backend does."""
        groups: dict[str, list[int]] = {}
        prepared = []
        for n, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.pop("max_gen_toks", 256))
            do_sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            sampling = Sampling(temperature, int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 0.0) or 0.0))
            ids = self.tok_encode(context)[-(self.max_length - budget):] or [self.eot_token_id]
            prepared.append((ids, until, budget, sampling))
            groups.setdefault(repr((until, budget, sampling)), []).append(n)
        batches, owners = [], []
        for members in groups.values():
            members.sort(key=lambda n: -len(prepared[n][0]))
            for k in range(0, len(members), self.batch_size):
                owners.append(members[k:k + self.batch_size])
                batches.append([prepared[n] for n in owners[-1]])
        texts = self.replica.map(batches, self._generate_batch)
        results = [""] * len(requests)
        for n, text in zip((n for group in owners for n in group), texts):
            results[n] = text
            self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return results
