"""DPO: loss and gradients equal TRL's DPOTrainer; chunked log-probs; the verb; learning on hh-rlhf."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from baichuan2.align.dpo import DPOArgs, dpo, dpo_loss, dpo_optim, final_turn_targets
from baichuan2.align.logprobs import token_logprobs
from baichuan2.model.checkpoint import load_pretrained
from baichuan2.tokenizer import Tokenizer
from baichuan2.train.engine import FitArgs
from tests.align.conftest import SHARED, synthetic_pairs
from tests.serve.conftest import checkpoint  # noqa: F401

HH = SHARED / "align" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float()


def _batch(n=3, width=14, seed=1):
    """Chosen rows then rejected rows: a prompt, a completion (completion_mask 1), right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (2 * n, width), generator=g)
    attn = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    for i in range(2 * n):
        prompt, end = 4 + i % 3, width - (i % 4)
        completion[i, prompt:end] = 1
        attn[i, end:] = 0
        ids[i, end:] = 0
    return ids, attn, completion


def _trl_loss(model, ids, attn, completion, ref_c, ref_r, loss_type, beta):
    """TRL 1.16's DPOTrainer._compute_loss on this batch (its fused LM head, precomputed reference)."""
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t,
                          unwrap_model=lambda m: m)
    trainer = SimpleNamespace(model=model, accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
                              precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                              loss_weights=[1.0], beta=beta, label_smoothing=0.0,
                              _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                              _total_train_tokens=0, _tp_size=1, use_weighting=False, ref_model=None)
    inputs = {"input_ids": ids, "attention_mask": attn, "completion_mask": completion,
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    return DPOTrainer._compute_loss(trainer, model, inputs, False), trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_gradients_equal_trl_dpo_trainer(loss_type):
    ids, attn, completion = _batch()
    labels = ids.masked_fill(completion == 0, -100)
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = labels[:, 1:]  # ours: targets[:, i] is the token after ids[:, i]
    lengths = (targets != -100).sum(-1).float()
    ref = torch.randn(ids.shape[0], generator=torch.Generator().manual_seed(2)) - 30.0
    n = ids.shape[0] // 2

    ours_model = _tiny_llama()
    hidden = ours_model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    lp = token_logprobs(hidden, ours_model.lm_head.weight, targets, chunk_rows=5).sum(-1)
    loss, rc, rr = dpo_loss(lp[:n], lp[n:], ref[:n], ref[n:], 0.1, 0.0, loss_type, lengths[:n], lengths[n:])
    loss = loss.mean()
    loss.backward()

    trl_model = _tiny_llama()
    trl_loss, metrics = _trl_loss(trl_model, ids, attn, completion, ref[:n], ref[n:], loss_type, 0.1)
    trl_loss.backward()

    assert abs(float(loss) - float(trl_loss)) < 1e-5, (float(loss), float(trl_loss))
    worst = max(float((a.grad - b.grad).abs().max()) for a, b in zip(ours_model.parameters(), trl_model.parameters(),
                                                                       strict=True))
    assert worst < 1e-5, worst
    assert abs(float(rc.mean()) - metrics["rewards/chosen"][0]) < 1e-5
    assert abs(float(rr.mean()) - metrics["rewards/rejected"][0]) < 1e-5


def test_chunked_logprobs_equal_the_full_softmax_and_never_hold_all_logits():
    torch.manual_seed(0)
    hidden = torch.randn(3, 20, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 20))
    targets[0, :5] = -100
    full = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    full = full.masked_fill(targets == -100, 0)
    chunked = token_logprobs(hidden, weight, targets, chunk_rows=7)
    assert torch.allclose(chunked, full, atol=1e-5)
    g1 = torch.autograd.grad(full.sum(), (hidden, weight))
    g2 = torch.autograd.grad(token_logprobs(hidden, weight, targets, chunk_rows=7).sum(), (hidden, weight))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2, strict=True))


def test_only_the_final_assistant_turn_is_scored():
    ids = list(range(10))
    targets = [-100, 5, 6, -100, -100, -100, 9, 10, 11, -100]
    assert final_turn_targets(ids, targets, 8) == (ids[2:], [-100, -100, -100, -100, 9, 10, 11, -100])


def test_dpo_verb_learns_synthetic_preferences_and_writes_its_outputs(checkpoint, tmp_path):  # noqa: F811
    from baichuan2.cli import main as cli

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(40)))
    out = tmp_path / "dpo"
    cli(["dpo", str(checkpoint), str(data), "--out_dir", str(out), "--args.batch_size", "8", "--args.epochs", "2",
         "--args.val_fraction", "0.2", "--optim.lr", "2e-3", "--train.precision", "fp32",
         "--train.micro_batch_size", "4"])
    res = json.loads((out.parent / "dpo-logs" / "dpo_result.json").read_text())
    assert res["val_before"]["val_accuracy"] == 0.5  # policy == reference: every implicit reward is 0
    assert res["val_after"]["val_accuracy"] > 0.9
    recs = [json.loads(x) for x in (out.parent / "dpo-logs" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "margin", "accuracy", "kl_proxy", "lr", "grad_norm"):
        assert key in recs[0], key
    assert (out.parent / "dpo-logs" / "reference_logps.safetensors").exists()
    assert load_pretrained(out).config.vocab_size > 0


def test_frozen_reference_equals_the_cached_one(checkpoint, tmp_path):  # noqa: F811
    from baichuan2.align.preference import to_pair

    tok = Tokenizer.from_pretrained(checkpoint)
    pairs = [to_pair(r) for r in synthetic_pairs(12)]
    curves = []
    for ref in ("precompute", "model"):
        dpo(load_pretrained(checkpoint), tok, pairs, tmp_path / ref, DPOArgs(batch_size=4, val_fraction=0.25,
                                                                             reference=ref),
            progress=False, optim=dpo_optim(lr=1e-3), fit_args=FitArgs(precision="fp32"))
        curves.append([json.loads(x)["loss"] for x in (tmp_path / f"{ref}-logs" / "metrics.jsonl").read_text()
                       .splitlines() if "val_loss" not in x])
    assert curves[0] == pytest.approx(curves[1], abs=1e-5)


@pytest.mark.skipif(not HH.exists(), reason="../shared/data/align/hh-rlhf not present")
def test_dpo_on_hh_rlhf_harmless_raises_held_out_implicit_reward_accuracy(checkpoint, tmp_path):  # noqa: F811
    """SFT a tiny model on the chosen transcripts, then DPO it on the pairs: the implicit reward
    beta * (log pi - log pi_ref) must prefer the chosen answer of held-out pairs well above chance."""
    from baichuan2.align.preference import read_pairs
    from baichuan2.align.sft import SFTArgs, sft, sft_optim, split_holdout

    tok = Tokenizer.from_pretrained(checkpoint)
    pairs = list(read_pairs([str(HH)]))
    train, val = split_holdout(pairs, 0.15, 0)
    train = train[:TRAIN_PAIRS]
    sft(load_pretrained(checkpoint), tok, [p.chosen for p in train], tmp_path / "sft",
        SFTArgs(max_length=96, batch_size=16, val_fraction=0.05), progress=False, optim=sft_optim(lr=3e-3),
        fit_args=FitArgs(precision="fp32"))
    res = dpo(load_pretrained(tmp_path / "sft"), tok, train, tmp_path / "dpo",
              DPOArgs(max_length=96, batch_size=16, epochs=DPO_EPOCHS), progress=False,
              optim=dpo_optim(lr=DPO_LR), fit_args=FitArgs(precision="fp32"), val_pairs=val)
    before, after = res["val_before"]["val_accuracy"], res["val_after"]["val_accuracy"]
    assert res["val_pairs"] > 300  # 346 held-out pairs: chance is 50 +- 2.7 % (1 sd)
    # measured 55.8% (2.1 sd above chance) with these settings; the margin asked here is 1.5 sd
    assert before == 0.5 and after >= 0.54, after


TRAIN_PAIRS, DPO_EPOCHS, DPO_LR = 600, 1, 1e-3
