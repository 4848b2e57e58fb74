"""Module-scoped fixtures shared by the study's and eval's tests of checkpoints that are not HF folders
(``--model-factory``, ``--config``); the runs themselves are written by tests/_model_runs.py."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def byte_tok_dir(tmp_path_factory):
    """A folder holding the byte tokenizer (257 tokens), for ``--tokenizer``."""
    from _model_runs import write_tokenizer

    return write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def cycle_text(tmp_path_factory):
    """A .jsonl of 16 documents of 120 words."""
    from _model_runs import write_text

    return write_text(tmp_path_factory.mktemp("data") / "text.jsonl")


@pytest.fixture(scope="module")
def nanogpt_run(tmp_path_factory):
    """(folder of ckpt_100.pt .. ckpt_800.pt in nanoGPT's format, their state dicts)."""
    from _model_runs import write_nanogpt_run

    root = tmp_path_factory.mktemp("nanogpt")
    return root, write_nanogpt_run(root)


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    """(root holding run/step-100 .. step-800 (DCP saves of a tiny HF llama) and config/, their states)."""
    pytest.importorskip("transformers")
    from _model_runs import write_dcp_run

    root = tmp_path_factory.mktemp("dcp")
    return root, write_dcp_run(root)
