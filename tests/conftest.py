"""Shared fixtures: a small char-level dataset and a tiny-model config writer."""

from __future__ import annotations

import pytest

from helpers import tiny_config


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> str:
    """A dataset prefix: the stdlib's json and email packages as UTF-8 bytes, one document a file."""
    from megatron.data.corpora import write_char_dataset

    return write_char_dataset(str(tmp_path_factory.mktemp("data") / "chars_text_document"))


@pytest.fixture
def tiny(tmp_path, char_data):
    """tiny(name="run", **overrides) -> config path."""
    return lambda name="run", **kw: tiny_config(tmp_path, char_data, name, **kw)
