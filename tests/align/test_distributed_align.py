"""SFT, DPO and the reward model under 2-process FSDP2 (gloo on CPU, launched with torchrun like a real job):
the same loss curve as one process, and rank 0 saves the same final model (LoRA merged) with its manifest."""

from __future__ import annotations

import json

import pytest
import torch

from baichuan2.cli import main as cli
from baichuan2.model.checkpoint import load_pretrained
from baichuan2.utils.checksums import verify_manifest
from baichuan2.utils.metrics import read_metrics
from tests.align.conftest import synthetic_pairs
from tests.serve.conftest import checkpoint  # noqa: F401
from tests.train.test_distributed import torchrun

LORA_TARGETS = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    convs = [{"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                           {"role": "assistant", "content": f"{i + 1}. 好的！"}]} for i in range(30)]
    (d / "sft.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in synthetic_pairs(24)), encoding="utf-8")
    return d


def losses(logs):
    return [r["loss"] for r in read_metrics(logs / "metrics.jsonl") if "event" not in r and "loss" in r]


def run_both(tmp_path, args: list[str], out_flag: str = "--out_dir"):
    """The same command on one process (in this one) and on two under torchrun; returns both output dirs."""
    one, two = tmp_path / "one" / "out", tmp_path / "two" / "out"
    cli([*args, out_flag, str(one)])
    torchrun(2, [*args, out_flag, str(two)])
    return one, two


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), (name, float((a[name] - b[name]).abs().max()))


def assert_frozen_base_with_rank_r_updates(merged: dict, base: dict, r: int) -> None:
    """LoRA kept the base frozen: untargeted weights are unchanged, targeted ones moved by a rank-r update only
    (a change to the base weight itself would be full-rank)."""
    assert not any("lora" in k for k in merged)
    for name, w in merged.items():
        if any(t in name for t in LORA_TARGETS):
            rank = int(torch.linalg.matrix_rank((w - base[name]).double(), atol=1e-7))
            assert 0 < rank <= r, (name, rank)
        else:
            assert torch.equal(w, base[name]), name


def test_sft_under_fsdp2_matches_one_process(checkpoint, data, tmp_path):  # noqa: F811
    one, two = run_both(tmp_path, ["sft", str(checkpoint), str(data / "sft.jsonl"), "--args.batch_size", "8",
                                   "--optim.lr", "3e-3", "--train.precision", "fp32", "--train.micro_batch_size", "3"])
    expected = losses(one.parent / "out-logs")
    assert len(expected) == 4
    assert losses(two.parent / "out-logs") == pytest.approx(expected, abs=1e-5)
    assert verify_manifest(two) > 0
    assert_same_weights(load_pretrained(one).state_dict(), load_pretrained(two).state_dict())
    a = json.loads((one.parent / "out-logs" / "sft_result.json").read_text())
    b = json.loads((two.parent / "out-logs" / "sft_result.json").read_text())
    assert b["val_loss_after"] == pytest.approx(a["val_loss_after"], abs=1e-5)


@pytest.mark.parametrize("variant", ["full-precomputed", "lora-reference-model"])
def test_dpo_under_fsdp2_matches_one_process_and_rank0_saves(checkpoint, data, tmp_path, variant):  # noqa: F811
    """Full fine-tuning with the reference log-probs shared out over the ranks and cached; and LoRA with the
    frozen reference sharded like the policy, 5 pairs a step in micro-batches of 2 (one rank gets a padding
    micro-batch): equal losses, and rank 0 saves the gathered, merged model the one process saves."""
    args = ["dpo", str(checkpoint), str(data / "pairs.jsonl"), "--args.max_length", "128", "--args.val_fraction",
            "0.25", "--optim.lr", "1e-3", "--train.precision", "fp32"]
    lora = variant.startswith("lora")
    if lora:
        args += ["--args.batch_size", "5", "--train.micro_batch_size", "2", "--args.reference", "model",
                 "--args.lora.r", "4", "--args.lora.alpha", "8", "--args.lora.dropout", "0"]
    else:
        args += ["--args.batch_size", "6"]
    one, two = run_both(tmp_path, args)
    expected = losses(one.parent / "out-logs")
    assert len(expected) == 4 if lora else 3
    assert losses(two.parent / "out-logs") == pytest.approx(expected, abs=1e-5)
    assert (two.parent / "out-logs" / "reference_logps.safetensors").exists() != lora
    result = json.loads((two.parent / "out-logs" / "dpo_result.json").read_text())
    assert result["val_after"]["val_accuracy"] > result["val_before"]["val_accuracy"]
    assert verify_manifest(two) > 0
    ours, ref = load_pretrained(two).state_dict(), load_pretrained(one).state_dict()
    assert_same_weights(ours, ref)
    if lora:
        assert_frozen_base_with_rank_r_updates(ours, load_pretrained(checkpoint).state_dict(), 4)

def test_lora_reward_model_under_fsdp2_matches_one_process_and_rank0_saves(checkpoint, data, tmp_path):  # noqa: F811
    """LoRA on the trunk, the scalar head trained in full: rank 0 saves the merged reward model one process saves."""
    from baichuan2.align.reward import RewardModel

    one, two = run_both(tmp_path, ["rm", "train", str(checkpoint), str(data / "pairs.jsonl"), "--args.batch_size",
                                   "6", "--args.max_length", "128", "--args.val_fraction", "0.25", "--optim.lr",
                                   "2e-3", "--train.precision", "fp32", "--args.lora.r", "4", "--args.lora.alpha",
                                   "8", "--args.lora.dropout", "0"])
    expected = losses(one.parent / "out-logs")
    assert len(expected) == 3
    assert losses(two.parent / "out-logs") == pytest.approx(expected, abs=1e-5)
    assert verify_manifest(two) > 0
    a, b = RewardModel.load(one), RewardModel.load(two)
    assert_same_weights(a.state_dict(), b.state_dict())
    assert (b.score_mean, b.score_std) == pytest.approx((a.score_mean, a.score_std), abs=1e-4)
    assert json.loads((two.parent / "out-logs" / "rm_result.json").read_text())["val_after"]["accuracy"] == \
        json.loads((one.parent / "out-logs" / "rm_result.json").read_text())["val_after"]["accuracy"]
    assert_frozen_base_with_rank_r_updates(b.lm.state_dict(), load_pretrained(checkpoint).state_dict(), 4)
