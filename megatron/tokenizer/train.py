"""Training a byte-level BPE tokenizer in the GPT-NeoX-20B layout.

The layout (what 20B_tokenizer.json looks like, and what HFTokenizer expects):

* ids 0 and 1 are ``<|endoftext|>`` and ``<|padding|>``; the 256 byte symbols are in the base
  alphabet, so no text is ever unknown;
* NFC normalisation, then GPT-2's byte-level pre-tokenizer (``add_prefix_space`` False by
  default, as in 20B: a document's first word and the same word after a space are different
  tokens);
* the last 23 ids are runs of 24 down to 2 spaces, added tokens as 20B's ids 50254-50276. At
  encode time added tokens are cut out of the text first (leftmost-longest, so a run of 30
  spaces is 24 + 6, and a run of 25 is 24 + one ordinary space that joins the next word).
  Training does the same cut before counting words (``split_space_runs``): otherwise the merges
  would spend vocabulary on space runs that encoding never hands to the BPE model.

Training streams: texts come from an iterator in batches and only the word counts stay in
memory, so a corpus larger than memory trains in flat memory.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Iterator

from megatron.tokenizer.tokenizer import EOD_TOKEN, PAD_TOKEN

MAX_SPACE_RUN = 24  # 20B: runs of 2..24 spaces have their own ids
_SPACE_RUN = re.compile(r" {2,}")


def space_run_tokens(max_space_run: int = MAX_SPACE_RUN) -> list[str]:
    """The space-run tokens in id order: longest first, as in 20B (id 50254 is 24 spaces)."""
    return [" " * n for n in range(max_space_run, 1, -1)]


def split_space_runs(text: str, max_space_run: int = MAX_SPACE_RUN) -> list[str]:
    """The pieces of ``text`` that the BPE model sees once space-run tokens are cut out.

    A run of n spaces is consumed in chunks of at most ``max_space_run``; only a final chunk of
    one space (n % max_space_run == 1) is not a token and stays in front of the next piece.
    """
    if max_space_run < 2:
        return [text]
    pieces: list[str] = []
    start = 0
    for m in _SPACE_RUN.finditer(text):
        if m.start() > start:
            pieces.append(text[start:m.start()])
        run = m.end() - m.start()
        start = m.end() - 1 if run % max_space_run == 1 else m.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _training_batches(texts: Iterable[str], max_space_run: int, batch_size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.extend(split_space_runs(text, max_space_run))
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    path: str,
    add_prefix_space: bool = False,
    max_space_run: int = MAX_SPACE_RUN,
    min_frequency: int = 2,
    batch_size: int = 1000,
) -> int:
    """Train on ``texts`` (any iterable, consumed once) and save a tokenizers JSON at ``path``.

    ``vocab_size`` counts everything: specials, learned merges and the space-run tokens. The
    result can be smaller when the corpus has too few distinct pairs. Returns the final size.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    runs = space_run_tokens(max_space_run)
    base = 256 + 2
    if vocab_size < base + len(runs):
        raise ValueError(
            f"vocab_size {vocab_size} is too small: 256 bytes + 2 special tokens + {len(runs)} space runs "
            f"need {base + len(runs)}"
        )
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(runs),
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # callers wrap the text iterator in their own tqdm bar
    )
    tok.train_from_iterator(_training_batches(texts, max_space_run, batch_size), trainer=trainer)
    # Added after training so they take the ids right after the learned vocabulary.
    tok.add_tokens([AddedToken(run, normalized=True) for run in runs])
    tmp = f"{path}.{os.getpid()}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tok.save(tmp)
    os.replace(tmp, path)
    return tok.get_vocab_size(with_added_tokens=True)
