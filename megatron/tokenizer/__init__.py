"""Tokenizers: ``build_tokenizer`` picks one by the config's ``tokenizer_type``."""

from megatron.tokenizer.tokenizer import (
    EOD_TOKEN,
    PAD_TOKEN,
    TOKENIZERS,
    AbstractTokenizer,
    CharLevelTokenizer,
    GPT2BPETokenizer,
    HFTokenizer,
    SPMTokenizer,
    build_tokenizer,
    pad_vocab_size,
)

__all__ = [
    "EOD_TOKEN",
    "PAD_TOKEN",
    "TOKENIZERS",
    "AbstractTokenizer",
    "CharLevelTokenizer",
    "GPT2BPETokenizer",
    "HFTokenizer",
    "SPMTokenizer",
    "build_tokenizer",
    "pad_vocab_size",
]
