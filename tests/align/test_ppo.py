"""PPO: the maths against hand computations, the KL schedule, critic warm-up, learning a known reward, stops."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from baichuan2.align.ppo import (KLArgs, PPOArgs, PPOError, PPOTrainer, RolloutArgs, encode_prompts, gae, kl_coef,
                                 pack_rollout, policy_loss, ppo, ppo_optim, shaped_rewards, value_loss)
from baichuan2.align.reward import RewardModel
from baichuan2.model.checkpoint import load_pretrained
from baichuan2.tokenizer import Tokenizer
from baichuan2.utils.io import InputError
from tests.align.conftest import checkpoint, reward_model  # noqa: F401

PROMPTS = [[{"role": "user", "content": f"Tell me something about the number {i}."}] for i in range(64)]
HIGH_IDS = range(512, 1024)  # the known reward: share of response tokens with an id in the upper half


def upper_half_reward(prompts, responses):
    return torch.tensor([sum(t in HIGH_IDS for t in r) / len(r) for r in responses])


@pytest.mark.parametrize("shape", ["cosine", "linear", "exponential"])
def test_kl_coefficient_decays_from_02_to_0005_over_the_run(shape):
    kl = KLArgs(init=0.2, final=0.005, schedule=shape)
    values = [kl_coef(i, kl, 350) for i in range(350)]
    assert values[0] == pytest.approx(0.2) and values[-1] == pytest.approx(0.005)
    assert all(a >= b for a, b in zip(values, values[1:]))
    mid = kl_coef(349 / 2, kl, 350)
    assert mid == pytest.approx({"cosine": 0.1025, "linear": 0.1025, "exponential": math.sqrt(0.2 * 0.005)}[shape])
    assert kl_coef(10_000, kl, 350) == pytest.approx(0.005)  # stays at the floor
    assert kl_coef(50, KLArgs(schedule="linear", steps=101), 350) == pytest.approx(0.1025)  # custom decay span
    assert kl_coef(200, KLArgs(schedule="constant"), 350) == 0.2
    with pytest.raises(InputError, match="unknown KL schedule"):
        kl_coef(0, KLArgs(schedule="step"), 10)


def test_gae_matches_a_per_row_recursion():
    torch.manual_seed(0)
    prompts, responses = [[5] * 3, [5] * 6, [5]], [[7] * 4, [7] * 2, [7] * 7]
    _, _, mask = pack_rollout(prompts, responses, pad=0)
    rewards, values = torch.randn(mask.shape), torch.randn(mask.shape)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for i in range(3):
        pos = mask[i].nonzero().flatten().tolist()
        assert pos == list(range(len(prompts[i]) - 1, len(prompts[i]) + len(responses[i]) - 1))
        a, expected = 0.0, {}
        for k in reversed(range(len(pos))):
            v_next = values[i, pos[k + 1]].item() if k + 1 < len(pos) else 0.0
            delta = rewards[i, pos[k]].item() + 0.9 * v_next - values[i, pos[k]].item()
            a = delta + 0.9 * 0.8 * a
            expected[pos[k]] = a
        for p, e in expected.items():
            assert adv[i, p].item() == pytest.approx(e, abs=1e-5)
            assert ret[i, p].item() == pytest.approx(e + values[i, p].item(), abs=1e-5)
        assert float(adv[i][mask[i] == 0].abs().sum()) == 0


def test_clipped_losses_and_reward_shaping_by_hand():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]])
    loss, stats = policy_loss(logp, old, torch.tensor([[1.0, -1.0]]), mask, clip=0.1)
    # A=+1, r=1.5: max(-1.5, -1.1) = -1.1;  A=-1, r=0.5: max(0.5, 0.9) = 0.9
    assert loss.item() == pytest.approx((-1.1 + 0.9) / 2) and stats["clip_frac"] == 1.0
    v, v_old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 1.0]])
    vloss, _ = value_loss(v, v_old, ret, mask, clip=0.2)
    # clipped V = [0.2, 0]: max((1-2)^2, (0.2-2)^2) = 3.24; max(1, 1) = 1
    assert vloss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)
    m = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    rewards, kl = shaped_rewards(torch.full((1, 4), -1.0), torch.full((1, 4), -1.5), torch.tensor([2.0]), m, beta=0.2)
    assert rewards[0].tolist() == pytest.approx([0.0, -0.1, -0.1 + 2.0, 0.0])
    assert kl.sum().item() == pytest.approx(1.0)


def _trainer(checkpoint, args, reward=upper_half_reward, lr=1e-3):  # noqa: F811
    torch.manual_seed(0)
    actor = load_pretrained(checkpoint)
    tok = Tokenizer.from_pretrained(checkpoint)
    prompts = encode_prompts(tok, PROMPTS, args, actor.config.max_position_embeddings)
    return PPOTrainer(actor, RewardModel(copy.deepcopy(actor)), reward, tok, args, optim=ppo_optim(lr=lr)), prompts


def test_critic_warm_up_freezes_the_actor_for_the_configured_iterations(checkpoint):  # noqa: F811
    args = PPOArgs(iterations=3, critic_warmup=2, rollout_batch_size=8, mini_batch_size=4,
                   rollout=RolloutArgs(max_new_tokens=6, max_prompt_tokens=32))
    trainer, prompts = _trainer(checkpoint, args)
    actor0 = copy.deepcopy(trainer.actor.state_dict())
    critic0 = copy.deepcopy(trainer.critic.state_dict())
    for it in range(2):
        stats = trainer.iteration(prompts[:8], it)
        assert stats["actor_updated"] is False and "policy_loss" not in stats
    assert all(torch.equal(v, actor0[k]) for k, v in trainer.actor.state_dict().items())
    assert not all(torch.equal(v, critic0[k]) for k, v in trainer.critic.state_dict().items())
    stats = trainer.iteration(prompts[:8], 2)
    assert stats["actor_updated"] is True and "clip_frac" in stats
    assert not all(torch.equal(v, actor0[k]) for k, v in trainer.actor.state_dict().items())
    # the reference never moves
    assert all(torch.equal(v, actor0[k]) for k, v in trainer.reference.state_dict().items())


def test_ppo_raises_a_known_reward_with_bounded_kl(checkpoint, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    actor = load_pretrained(checkpoint)
    tok = Tokenizer.from_pretrained(checkpoint)
    args = PPOArgs(iterations=20, critic_warmup=2, rollout_batch_size=64, mini_batch_size=16,
                   kl=KLArgs(init=0.05, final=0.01), normalize_reward=False, max_kl=20.0,
                   rollout=RolloutArgs(max_new_tokens=8, max_prompt_tokens=32))
    summary = ppo(actor, RewardModel(copy.deepcopy(actor)), upper_half_reward, tok, PROMPTS, tmp_path / "actor", args,
                  progress=False, optim=ppo_optim(lr=1e-3))
    logs = [json.loads(x) for x in (tmp_path / "actor-logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 20 and [r["actor_updated"] for r in logs[:3]] == [False, False, True]
    first = sum(r["score"] for r in logs[:3]) / 3
    last = sum(r["score"] for r in logs[-5:]) / 5
    assert last > first + 0.04, (first, last)  # about 0.5 at the start (half the vocabulary)
    assert all(math.isfinite(r["kl"]) and r["kl"] < 20.0 for r in logs)
    assert logs[0]["kl_coef"] == pytest.approx(0.05) and logs[-1]["kl_coef"] == pytest.approx(0.01)
    for key in ("entropy", "value_loss", "clip_frac", "approx_kl", "response_length", "score"):
        assert key in logs[-1]
    assert (tmp_path / "actor-logs" / "ppo_curve.png").stat().st_size > 10_000
    assert summary["iterations"] == 20
    assert load_pretrained(tmp_path / "actor").config.vocab_size == actor.config.vocab_size


def test_ppo_stops_clearly_on_kl_blow_up_and_non_finite_rewards(checkpoint):  # noqa: F811
    args = PPOArgs(iterations=5, critic_warmup=0, rollout_batch_size=8, mini_batch_size=8, max_kl=1e-3,
                   rollout=RolloutArgs(max_new_tokens=6, max_prompt_tokens=32))
    trainer, prompts = _trainer(checkpoint, args, lr=5e-2)
    with pytest.raises(PPOError, match="KL blow-up"):
        for it in range(5):
            trainer.iteration(prompts[:8], it)
    trainer, prompts = _trainer(checkpoint, args, reward=lambda p, r: torch.full((len(r),), float("nan")))
    with pytest.raises(PPOError, match="iteration 0: the reward function returned non-finite scores"):
        trainer.iteration(prompts[:8], 0)


def test_ppo_cli_with_a_trained_reward_model(reward_model, checkpoint, tmp_path):  # noqa: F811
    from baichuan2.cli import main

    rm_dir, _ = reward_model
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"Is {i} a number?"}) + "\n" for i in range(8)))
    main(["ppo", str(checkpoint), str(rm_dir), str(prompts), "--out_dir", str(tmp_path / "ppo"),
          "--args.iterations", "3", "--args.critic_warmup", "1", "--args.rollout_batch_size", "4",
          "--args.mini_batch_size", "2", "--args.rollout.max_new_tokens", "6", "--args.kl.schedule", "linear"])
    logs = [json.loads(x) for x in (tmp_path / "ppo-logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["actor_updated"] for r in logs] == [False, True, True]
    assert logs[0]["kl_coef"] == pytest.approx(0.2) and logs[-1]["kl_coef"] == pytest.approx(0.005)
    assert (tmp_path / "ppo" / "model.safetensors").exists()
    with pytest.raises(SystemExit, match="rollout.max_new_tokens=4096 leaves no room"):
        main(["ppo", str(checkpoint), str(rm_dir), str(prompts), "--out_dir", str(tmp_path / "p2"),
              "--args.rollout.max_new_tokens", "4096"])


def test_bad_ppo_settings_are_refused_before_any_work(checkpoint, tmp_path):  # noqa: F811
    actor = load_pretrained(checkpoint)
    tok = Tokenizer.from_pretrained(checkpoint)
    with pytest.raises(InputError, match="iterations must be >= 1.*clip_ratio must be > 0"):
        ppo(actor, RewardModel(actor), upper_half_reward, tok, PROMPTS, tmp_path / "a",
            PPOArgs(iterations=0, clip_ratio=0.0))
    with pytest.raises(InputError, match="unknown KL schedule"):
        ppo(actor, RewardModel(actor), upper_half_reward, tok, PROMPTS, tmp_path / "a", PPOArgs(kl=KLArgs(schedule="x")))


def test_a_killed_ppo_run_resumes_to_the_same_results(checkpoint, tmp_path, monkeypatch):  # noqa: F811
    """Checkpoint every iteration; die inside iteration 3; resume: metrics and final actor equal an unbroken run.

    (Bit-exact: it caught fused AdamW's moments restored in the weights' old memory layout while rollouts
    had re-laid the actor column-major, which changed the first actor update after the resume.)"""
    from baichuan2.train.engine import CheckpointArgs

    tok = Tokenizer.from_pretrained(checkpoint)
    args = PPOArgs(iterations=4, critic_warmup=1, rollout_batch_size=4, mini_batch_size=2, seed=3,
                   rollout=RolloutArgs(max_new_tokens=5, max_prompt_tokens=24))
    every = CheckpointArgs(save_every=1, keep_last=2)

    def run(out, resume=False):
        torch.manual_seed(0)
        actor = load_pretrained(checkpoint)
        return ppo(actor, RewardModel(copy.deepcopy(actor)), upper_half_reward, tok, PROMPTS[:12], out, args,
                   progress=False, optim=ppo_optim(lr=1e-3), checkpoint=every, resume=resume)

    run(tmp_path / "whole")
    real = PPOTrainer.iteration

    def dies_at_3(self, prompts, iteration):
        if iteration == 3:
            raise KeyboardInterrupt  # the process is killed mid-run
        return real(self, prompts, iteration)

    monkeypatch.setattr(PPOTrainer, "iteration", dies_at_3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    monkeypatch.setattr(PPOTrainer, "iteration", real)
    run(tmp_path / "killed", resume=True)
    logs = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("whole-logs", "killed-logs")]
    assert [r["step"] for r in logs[1]] == [0, 1, 2, 3]
    for a, b in zip(*logs, strict=True):
        assert a["score"] == b["score"] and a["value_loss"] == b["value_loss"] and a["kl"] == b["kl"], (a, b)
        assert a.get("policy_loss") == b.get("policy_loss"), (a, b)
    whole, resumed = load_pretrained(tmp_path / "whole"), load_pretrained(tmp_path / "killed")
    for (name, x), y in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(x, y), (name, float((x - y).abs().max()))
