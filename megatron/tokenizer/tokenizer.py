"""Tokenizers behind one small interface.

The training loop and the data tools only need five things from a tokenizer: ``vocab_size``,
``eod`` (the id appended after every document), ``pad``, ``tokenize`` / ``tokenize_batch`` and
``detokenize``. The choice between implementations is made once, in :func:`build_tokenizer`,
by picking a class from ``TOKENIZERS``; nothing else switches on the type string.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Callable, Iterable, Sequence

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"


class AbstractTokenizer(ABC):
    """What the rest of the framework may rely on."""

    name: str = "abstract"

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (before padding for tensor parallelism)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id, appended after every document by the preprocessors."""

    @property
    def pad(self) -> int:
        """Padding id; tokenizers without a dedicated one pad with ``eod``."""
        return self.eod

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Ids for one text."""

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids for many texts; subclasses override when a faster batched path exists."""
        return [self.tokenize(t) for t in texts]

    @abstractmethod
    def detokenize(self, ids: Iterable[int]) -> str:
        """Text for a sequence of ids (numpy arrays and tensors are accepted)."""


def _as_int_list(ids: Iterable[int]) -> list[int]:
    # numpy arrays / torch tensors: .tolist() gives Python ints, which the Rust side requires.
    tolist = getattr(ids, "tolist", None)
    return [int(i) for i in (tolist() if callable(tolist) else ids)]


def _require_file(path: str | None, key: str, tokenizer_type: str) -> str:
    """Resolve a config path, failing with the config key so the user knows what to fix."""
    if path is None:
        raise ValueError(f"{tokenizer_type} needs {key} to be set")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key} {path!r} (for {tokenizer_type}) does not exist")
    return path


class HFTokenizer(AbstractTokenizer):
    """A ``tokenizers`` JSON file, e.g. GPT-NeoX's 20B_tokenizer.json."""

    name = "HFTokenizer"

    def __init__(self, vocab_file: str) -> None:
        from tokenizers import Tokenizer

        self.vocab_file = vocab_file
        try:
            self._tok = Tokenizer.from_file(vocab_file)
        except Exception as err:  # the Rust side raises a bare Exception that omits the path
            raise ValueError(f"{vocab_file}: not a tokenizers JSON file ({err})") from err
        eod = self._tok.token_to_id(EOD_TOKEN)
        if eod is None:
            raise ValueError(f"{vocab_file}: tokenizer has no {EOD_TOKEN} token to use as eod")
        pad = self._tok.token_to_id(PAD_TOKEN)
        self._eod = eod
        self._pad = eod if pad is None else pad
        # Added tokens can sit above the model vocabulary; count them so no id is out of range.
        self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch runs on the Rust thread pool: several times faster than a Python loop.
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def detokenize(self, ids: Iterable[int]) -> str:
        # Keep special tokens so that detokenize(tokenize(x)) == x and eod stays visible in dumps.
        return self._tok.decode(_as_int_list(ids), skip_special_tokens=False)


class GPT2BPETokenizer(HFTokenizer):
    """GPT-2's vocab.json + merges.txt, run through the ``tokenizers`` byte-level BPE."""

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        self.vocab_file = vocab_file
        self.merge_file = merge_file
        try:
            tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        except Exception as err:  # bare Exception from the Rust side, without the paths
            raise ValueError(f"{vocab_file} / {merge_file}: not a GPT-2 vocab.json / merges.txt pair ({err})") from err
        # GPT-2 does not add a prefix space; its regex splits contractions, words, numbers.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        eod = tok.token_to_id(EOD_TOKEN)
        if eod is None:
            raise ValueError(f"{vocab_file}: GPT-2 vocabulary has no {EOD_TOKEN} entry")
        # Registered as special so a literal "<|endoftext|>" in text maps to the one id, as in
        # Hugging Face's GPT-2 tokenizer, instead of being split into pieces.
        tok.add_special_tokens([EOD_TOKEN])
        self._tok = tok
        self._eod = self._pad = eod
        self._vocab_size = tok.get_vocab_size(with_added_tokens=True)


class CharLevelTokenizer(AbstractTokenizer):
    """UTF-8 bytes as ids: 0..255 are the bytes, 256 is ``<|endoftext|>``; vocab_size 257.

    GPT-NeoX's char-level tokenizer reuses id 0 for eod and declares a vocab of 512. Here eod gets
    its own id so that every byte, NUL included, round-trips, and the vocab is no larger than the
    ids that can occur (padding for tensor parallelism is pad_vocab_size's job). pad = eod.
    """

    name = "CharLevelTokenizer"
    EOD_ID = 256

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eod(self) -> int:
        return self.EOD_ID

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:
        ids = _as_int_list(ids)
        out = bytearray()
        for i in ids:
            if 0 <= i < 256:
                out.append(i)
            elif i == self.EOD_ID:
                out += EOD_TOKEN.encode()
            else:
                raise ValueError(f"CharLevelTokenizer: id {i} is outside 0..256")
        # A sample cut from the middle of a document can split a multi-byte character.
        return out.decode("utf-8", errors="replace")


class SPMTokenizer(AbstractTokenizer):
    """A SentencePiece model file (``.model``), e.g. Llama's tokenizer.model; GPT-NeoX's
    ``SPMTokenizer``. Text is encoded as is (no bos/eos added), ids decode back to text.

    eod is the ``<|endoftext|>`` piece when the model has one (GPT-NeoX's rule); otherwise the
    model's eos id (Llama's ``</s>``). GPT-NeoX falls back to piece_to_id's answer, the unknown
    id, which would end every document with <unk>; with neither piece this refuses instead.
    pad is the model's pad id when it defines one, else eod."""

    name = "SPMTokenizer"

    def __init__(self, vocab_file: str) -> None:
        import sentencepiece

        self.vocab_file = vocab_file
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=vocab_file)
        except (OSError, RuntimeError) as err:  # add the path: the C++ message names it only sometimes
            raise ValueError(f"{vocab_file}: not a SentencePiece model file ({err})") from err
        eod = self._sp.piece_to_id(EOD_TOKEN)
        if eod == self._sp.unk_id() and self._sp.id_to_piece(eod) != EOD_TOKEN:  # absent: piece_to_id gives unk
            eod = self._sp.eos_id()
        if eod < 0:
            raise ValueError(f"{vocab_file}: SentencePiece model has neither {EOD_TOKEN} nor an eos piece "
                             "to use as eod")
        self._eod = eod
        self._pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else eod

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    def id_to_piece(self, i: int) -> str:
        """The piece (token text) of an id, e.g. for naming special tokens in other tools' configs."""
        return self._sp.id_to_piece(i)

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))  # a list is encoded on SentencePiece's own threads

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode(_as_int_list(ids))


def _build_hf(vocab_file: str | None, merge_file: str | None) -> AbstractTokenizer:
    return HFTokenizer(_require_file(vocab_file, "vocab_file", "HFTokenizer"))


def _build_gpt2(vocab_file: str | None, merge_file: str | None) -> AbstractTokenizer:
    return GPT2BPETokenizer(
        _require_file(vocab_file, "vocab_file", "GPT2BPETokenizer"),
        _require_file(merge_file, "merge_file", "GPT2BPETokenizer"),
    )


def _build_spm(vocab_file: str | None, merge_file: str | None) -> AbstractTokenizer:
    return SPMTokenizer(_require_file(vocab_file, "vocab_file", "SPMTokenizer"))


def _build_char(vocab_file: str | None, merge_file: str | None) -> AbstractTokenizer:
    return CharLevelTokenizer()


TOKENIZERS: dict[str, Callable[[str | None, str | None], AbstractTokenizer]] = {
    "HFTokenizer": _build_hf,
    "GPT2BPETokenizer": _build_gpt2,
    "CharLevelTokenizer": _build_char,
    "SPMTokenizer": _build_spm,
}
# GPT-NeoX's other tokenizer types, refused with what to use instead.
NOT_SUPPORTED = {
    "HFGPT2Tokenizer": "use GPT2BPETokenizer with vocab_file (vocab.json) and merge_file (merges.txt), or "
                       "HFTokenizer with a tokenizers JSON file",
    "TiktokenTokenizer": "tiktoken fetches its vocabularies from the internet at first use; use HFTokenizer "
                         "with a tokenizers JSON file of the same vocabulary",
}


def build_tokenizer(
    tokenizer_type: str, vocab_file: str | None = None, merge_file: str | None = None
) -> AbstractTokenizer:
    """Build the tokenizer named by the config's ``tokenizer_type``.

    Raises ValueError for an unknown type (listing the valid ones) and FileNotFoundError naming
    the path and its config key (vocab_file / merge_file) when a file is missing.
    """
    if tokenizer_type in NOT_SUPPORTED:
        raise ValueError(f"tokenizer_type {tokenizer_type!r} is not supported: {NOT_SUPPORTED[tokenizer_type]}")
    try:
        factory = TOKENIZERS[tokenizer_type]
    except KeyError:
        valid = ", ".join(TOKENIZERS)
        raise ValueError(f"unknown tokenizer_type {tokenizer_type!r}; valid types: {valid}") from None
    return factory(vocab_file, merge_file)


def pad_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, model_parallel_size: int) -> int:
    """Round the vocabulary up so every tensor-parallel shard of the embedding is equal and
    a multiple of ``make_vocab_size_divisible_by`` (GPU-friendly GEMM sizes).

    50,277 with 128 x 2 gives 50,432.
    """
    if vocab_size <= 0 or make_vocab_size_divisible_by <= 0 or model_parallel_size <= 0:
        raise ValueError(
            "pad_vocab_size: vocab_size, make_vocab_size_divisible_by and model_parallel_size "
            f"must be positive, got {vocab_size}, {make_vocab_size_divisible_by}, {model_parallel_size}"
        )
    multiple = make_vocab_size_divisible_by * model_parallel_size
    return -(-vocab_size // multiple) * multiple
