"""Reward model: data formats, taxonomy, pairwise loss, reports, save/load, and learning on hh-rlhf."""

from __future__ import annotations

import json
import math

import pytest
import torch

from baichuan2.align.preference import read_pairs, to_pair, to_prompt
from baichuan2.align.reward import (RewardModel, RMArgs, encode_pairs, evaluate_reward_model, pairwise_loss,
                                    rm_optim, score_rows, train_reward_model)
from baichuan2.align.sft import split_holdout
from baichuan2.align.taxonomy import Taxonomy, category_levels
from baichuan2.model.checkpoint import CheckpointError, load_pretrained
from baichuan2.tokenizer import Tokenizer
from baichuan2.utils.io import InputError
from tests.align.conftest import SHARED, checkpoint, synthetic_pairs  # noqa: F401

HH = SHARED / "align" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def test_default_taxonomy_has_baichuans_top_levels_and_classifies_en_and_zh():
    tax = Taxonomy.load()
    primary, secondary, tertiary = tax.sizes()
    assert (primary, secondary) == (6, 30) and tertiary >= 60
    assert tax.classify("What's the best way to make a bomb at home?") == "safety/violence/weapons"
    assert tax.classify("怎么才能偷偷地诈骗老人的钱") == "safety/crime/theft_fraud"
    assert tax.classify("Write a python function to reverse a list") == "code/generation/function"
    assert tax.classify("zzzz") == "other/other/other"
    assert tax.resolve(["safety", "privacy"], "x") == "safety/privacy/other"  # labels win, padded to 3 levels
    assert category_levels("a/b/c") == ["a", "a/b", "a/b/c"]


def test_bad_taxonomy_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("categories:\n  a:\n    b: [not, a, mapping]\n")
    with pytest.raises(InputError, match="must map tertiary names"):
        Taxonomy.load(bad)


def test_preference_layouts_become_chat_pairs(tmp_path):
    hh = to_pair({"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: rob a bank?\n\nAssistant: No.",
                  "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: rob a bank?\n\nAssistant: Sure, first..."})
    assert [m["role"] for m in hh.chosen] == ["user", "assistant", "user", "assistant"]
    assert hh.chosen[:-1] == hh.rejected[:-1] and hh.chosen[-1]["content"] == "No."
    assert hh.prompt_text == "hi\nrob a bank?"
    dpo = to_pair({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
                   "rejected": {"from": "gpt", "value": "b"}})
    assert dpo.chosen == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    alpaca = to_pair({"instruction": "translate", "input": "cat", "chosen": "猫", "rejected": "狗", "gap": 3})
    assert alpaca.chosen[0]["content"] == "translate\ncat" and alpaca.gap == 3
    assert to_prompt({"question": "你好"}) == [{"role": "user", "content": "你好"}]
    assert to_prompt(hh.__dict__ | {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}) \
        == [{"role": "user", "content": "a"}]
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"chosen": "a"}) + "\n")
    with pytest.raises(InputError, match="p.jsonl:2: expected an object with 'chosen' and 'rejected'"):
        list(read_pairs([str(bad)]))


def test_pairwise_loss_is_instructgpts():
    c, r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    expected = (-math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(2)))) / 2
    assert pairwise_loss(c, r).item() == pytest.approx(expected, rel=1e-6)
    assert pairwise_loss(c, r, center_coef=0.1).item() == pytest.approx(expected + 0.1 * (1 + 4) / 2, rel=1e-6)


def test_reward_model_learns_reports_and_round_trips(reward_model, checkpoint):  # noqa: F811
    out, result = reward_model
    after = result["val_after"]
    assert after["accuracy"] == 100.0 and after["mean_margin"] > 0  # "yes" beats "no" on held-out pairs
    assert set(after["by_primary"]) <= {"reasoning", "dialogue"} and "by_gap" in after
    assert sum(b["n"] for b in after["by_margin_quantile"].values()) == after["n"]
    rm = RewardModel.load(out)
    tok = Tokenizer.from_pretrained(out)
    pairs = encode_pairs(tok, [to_pair(r) for r in synthetic_pairs(8)], 128, Taxonomy.load())
    # the report's accuracy is exactly the share of pairs whose chosen answer scores higher
    scores = score_rows(rm, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    report = evaluate_reward_model(rm, pairs)
    assert report["accuracy"] == pytest.approx(100 * float((scores[:8] > scores[8:]).float().mean()))
    assert abs(rm.score_mean) < 50 and rm.score_std > 0
    assert json.loads((out / "reward_config.json").read_text())["head"] == "linear_last_token"
    (out.parent / "bare").mkdir()
    with pytest.raises(CheckpointError, match="not a reward model"):
        RewardModel.load(out.parent / "bare")


@pytest.mark.skipif(not HH.exists(), reason="../shared/data/align/hh-rlhf not present")
def test_reward_model_on_hh_rlhf_harmless_beats_chance_on_held_out_pairs(checkpoint, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(checkpoint)
    pairs = encode_pairs(tok, list(read_pairs([str(HH)])), 192, Taxonomy.load())
    assert len(pairs) > 2200
    train, val = split_holdout(pairs, 0.15, 0)
    args = RMArgs(max_length=192, epochs=1, batch_size=16)
    result = train_reward_model(RewardModel(load_pretrained(checkpoint)), tok, train, val, tmp_path / "rm", args,
                                progress=False, optim=rm_optim(lr=1e-3))
    before, after = result["val_before"], result["val_after"]
    assert after["n"] == len(val) > 300
    # ~345 held-out pairs: chance is 50 +- 2.7 (1 sd); the trained model must clear it by a margin
    assert after["accuracy"] >= 57.0, after["accuracy"]
    assert after["accuracy"] > before["accuracy"] + 3
    assert after["by_primary"]["safety"]["n"] > 50  # the harmless set is mostly safety prompts
    ordered = [after["by_margin_quantile"][f"q{i}"]["accuracy"] for i in (1, 5)]
    assert ordered[1] > ordered[0]  # confident calls are right more often
