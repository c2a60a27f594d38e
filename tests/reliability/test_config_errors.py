"""Issue 14, item 7: each bad setting is one line naming the setting and what is allowed, never a traceback."""

from __future__ import annotations

import json
import re

import pytest

from .conftest import pretrain_argv


def _cli_error(argv) -> str:
    """The one line ``baichuan2 <argv>`` exits with (in-process, as the console script runs it)."""
    from baichuan2.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(map(str, argv)))  # any other exception is the traceback this suite forbids
    message = str(exc.value.code)
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.parametrize("extra, expected", [
    (["--model.preset", "nope"], r"unknown model preset 'nope'; known presets: .*tiny-rope"),
    (["--model.overrides", json.dumps({"hiden_size": 64})], r"unknown model.overrides key 'hiden_size'; allowed: "
                                                           r"vocab_size, hidden_size"),
    (["--model.overrides", json.dumps({"hidden_size": "abc"})], r"hidden_size must be an integer, got 'abc'"),
    (["--model.overrides", json.dumps({"rope_theta": "big"})], r"rope_theta must be a number, got 'big'"),
    (["--model.overrides", json.dumps({"position_embedding": "sinus"})],
     r"position_embedding must be 'rope' or 'alibi', got 'sinus'"),
    (["--data.seq_len", "0"], r"data.seq_len must be a positive integer, got 0"),
    (["--train.micro_batch_size", "0"], r"train.micro_batch_size must be a positive integer, got 0"),
    (["--train.global_batch_tokens", "-1"], r"train.global_batch_tokens must be a positive integer, got -1"),
])
def test_pretrain_config_errors(token_shards, tmp_path, extra, expected):
    assert re.search(expected, _cli_error([*pretrain_argv(token_shards, tmp_path / "run"), *extra]))


def test_resume_from_a_missing_directory(token_shards, tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    error = _cli_error([*pretrain_argv(token_shards, tmp_path / "run"), "--resume", missing])
    assert f"checkpoint directory {missing} not found" in error


def test_data_run_unknown_executor(tmp_path):
    corpus = tmp_path / "in.jsonl"
    corpus.write_text(json.dumps({"text": "hello world"}) + "\n")
    error = _cli_error(["data", "run", corpus, "--out_dir", tmp_path / "out", "--executor", "slurm"])
    assert "unknown executor 'slurm'; allowed: 'local' or 'ray'" in error


def test_tokenizer_vocab_too_small(tmp_path):
    corpus = tmp_path / "in.jsonl"
    corpus.write_text(json.dumps({"text": "hello world"}) + "\n")
    error = _cli_error(["tokenizer", "train", corpus, tmp_path / "tok", "--vocab_size", "10"])
    assert "vocab_size 10 is too small: at least 259" in error
