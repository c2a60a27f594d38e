"""Shared alignment fixtures: the tiny chat checkpoint and a small reward model trained on synthetic pairs."""

from __future__ import annotations

import pytest
import torch

from tests.serve.conftest import checkpoint  # noqa: F401  (session fixture reused here)

SHARED = __import__("pathlib").Path(__file__).resolve().parents[2].parent / "shared" / "data"


def synthetic_pairs(n: int = 48) -> list[dict]:
    """Chosen answers say "yes", rejected ones say "no": a preference a tiny model learns in seconds."""
    return [{"prompt": f"Question {i}: is {i} a number?", "chosen": f"yes yes, {i} is.", "rejected": f"no. {i}",
             "category": ["reasoning", "math", "arithmetic"] if i % 2 else "dialogue/chitchat/greeting",
             "gap": 1 + i % 3} for i in range(n)]


@pytest.fixture(scope="session")
def reward_model(checkpoint, tmp_path_factory):  # noqa: F811
    from baichuan2.align.preference import to_pair
    from baichuan2.align.reward import RewardModel, RMArgs, encode_pairs, rm_optim, train_reward_model
    from baichuan2.align.sft import split_holdout
    from baichuan2.align.taxonomy import Taxonomy
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(checkpoint)
    pairs = encode_pairs(tok, [to_pair(r) for r in synthetic_pairs()], 128, Taxonomy.load())
    train, val = split_holdout(pairs, 0.25, 0)
    out = tmp_path_factory.mktemp("rm") / "rm"
    args = RMArgs(max_length=128, epochs=3, batch_size=8)
    result = train_reward_model(RewardModel(load_pretrained(checkpoint)), tok, train, val, out, args, progress=False,
                                optim=rm_optim(lr=2e-3))
    return out, result
