"""PPO from human feedback with Baichuan 2's settings: actor, frozen reference, frozen reward, critic.

One iteration: sample responses to a batch of prompts (KV-cache generation) -> score them with the reward
model (one scalar per response, normalised and clipped) -> per-token reward ``-beta * (log pi - log
pi_ref)`` plus the score on the last response token -> GAE advantages and returns -> clipped value loss
for the critic and clipped policy loss for the actor, each with its own AdamW and gradient clip.

Baichuan 2 (report section 3.4) as defaults: the critic alone trains for the first 20 iterations, then
both; constant lr 5e-6; gradient clip 0.5; PPO clip 0.1; KL coefficient 0.2 decaying to 0.005 over the
run (the report does not give the shape; cosine by default, linear/exponential/constant selectable);
350 iterations. Not stated in the report and set as the common anchors do: gamma 1, lambda 0.95,
whitened advantages, value clip 0.2, one PPO epoch per rollout.

The run stops with a ``PPOError`` naming the iteration when a loss or reward is not finite or the mean
KL to the reference exceeds ``max_kl`` (a blow-up), before any bad update reaches the weights on disk.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from baichuan2.model.generate import column_major_weights
from baichuan2.train.engine import (BadStepGuard, CheckpointArgs, DivergenceArgs, FitArgs, OptimizerStep, autocast_for,
                                    resolve_precision)
from baichuan2.train.optim import OptimArgs
from baichuan2.utils.io import InputError, atomic_write_json

RewardFn = Callable[[list[list[int]], list[list[int]]], torch.Tensor]  # (prompts, responses) -> [n] scores


class PPOError(RuntimeError):
    """PPO stopped: non-finite numbers or KL blow-up (the message says which and when)."""


@dataclass
class KLArgs:
    """Args:
        init: KL coefficient at the first iteration (Baichuan 2: 0.2).
        final: KL coefficient at the end of the decay (Baichuan 2: 0.005).
        schedule: Decay shape: cosine | linear | exponential | constant (the report does not say).
        steps: Iterations over which to decay (0 = the whole run).
    """

    init: float = 0.2
    final: float = 0.005
    schedule: str = "cosine"
    steps: int = 0


def kl_coef(iteration: int, kl: KLArgs, total: int) -> float:
    """The KL coefficient at ``iteration`` (0-based): ``init`` at 0, ``final`` at the end of the decay."""
    span = max(1, (kl.steps or total) - 1)
    t = min(1.0, iteration / span)
    if kl.schedule == "constant":
        return kl.init
    if kl.schedule == "linear":
        return kl.init + (kl.final - kl.init) * t
    if kl.schedule == "cosine":
        return kl.final + 0.5 * (kl.init - kl.final) * (1 + math.cos(math.pi * t))
    if kl.schedule == "exponential":
        return kl.init * (kl.final / kl.init) ** t
    raise InputError(f"unknown KL schedule {kl.schedule!r} (cosine, linear, exponential or constant)")


@dataclass
class RolloutArgs:
    """Args:
        max_new_tokens: Longest response.
        max_prompt_tokens: Prompts are left-truncated to this many tokens.
        temperature: Sampling temperature (1 = the policy itself, which the PPO ratio assumes).
        top_k: Top-k filter (0 = off).
        top_p: Nucleus filter (1 = off).
    """

    max_new_tokens: int = 128
    max_prompt_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class PPOArgs:
    """Args:
        iterations: Rollout + update rounds (Baichuan 2: 350).
        rollout_batch_size: Prompts per iteration.
        mini_batch_size: Responses per gradient step.
        ppo_epochs: Passes over each rollout batch.
        critic_lr: Critic learning rate (0 = the actor's optim.lr).
        clip_ratio: PPO policy clip epsilon (Baichuan 2: 0.1).
        value_clip: Value-function clip around the rollout values.
        critic_warmup: Iterations at the start in which only the critic learns (Baichuan 2: 20).
        kl: KL-penalty coefficient schedule.
        gamma: GAE discount.
        lam: GAE lambda.
        whiten_advantages: Normalise advantages per batch.
        normalize_reward: Put reward-model scores on mean 0 / std 1 of its training answers.
        reward_clip: Clip the (normalised) score to +-this.
        max_kl: Stop when the mean per-response KL to the reference exceeds this many nats.
        rollout: Sampling settings of the rollouts.
        save_every: Also release the actor (HF layout) every N iterations (0 = only at the end).
        seed: Prompt order and sampling seed.
    """

    iterations: int = 350
    rollout_batch_size: int = 16
    mini_batch_size: int = 8
    ppo_epochs: int = 1
    critic_lr: float = 0.0
    clip_ratio: float = 0.1
    value_clip: float = 0.2
    critic_warmup: int = 20
    kl: KLArgs = field(default_factory=KLArgs)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    normalize_reward: bool = True
    reward_clip: float = 10.0
    max_kl: float = 20.0
    rollout: RolloutArgs = field(default_factory=RolloutArgs)
    save_every: int = 0
    seed: int = 0


# ------------------------------------------------------------------------------------------------
# The maths (plain functions over [batch, positions] tensors, mask 1 = response token)
# ------------------------------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's (contiguous) response positions.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` with ``V`` = 0 after the last response token;
    ``A_t = delta_t + gamma lam A_{t+1}``; returns ``A + V``. Positions outside the mask are 0.
    """
    values, rewards = values * mask, rewards * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    width = rewards.shape[1]
    for t in reversed(range(width)):
        next_mask = mask[:, t + 1] if t + 1 < width else torch.zeros_like(last)
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        last = delta + gamma * lam * next_mask * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate ``mean(max(-A r, -A clip(r, 1-eps, 1+eps)))`` with ``r = pi / pi_old``."""
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_frac": float(masked_mean((clipped > unclipped).float(), mask)),
                 "approx_kl": float(masked_mean(0.5 * (logp - old_logp) ** 2, mask))}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, dict]:
    """``0.5 mean(max((V - R)^2, (clip(V, V_old +- c) - R)^2))``."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(a, b), mask)
    return loss, {"value_clip_frac": float(masked_mean((b > a).float(), mask))}


def shaped_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                   beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``-beta (log pi - log pi_ref)``, plus each row's score at its last response token.
    Returns (rewards, per-token KL)."""
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    last = mask.shape[1] - 1 - mask.flip(1).float().argmax(dim=1)  # index of the last masked position
    rewards[torch.arange(mask.shape[0]), last] += scores.to(rewards.dtype)
    return rewards, kl


# ------------------------------------------------------------------------------------------------
# Models and rollouts
# ------------------------------------------------------------------------------------------------

def token_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, with_entropy: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[b, t-1]`` log p(ids[:, j+1] | ids[:, :j+1]) (and the entropy of that distribution), computed in chunks
    of positions: no ``[b, t, vocab]`` logits tensor (``align.logprobs``)."""
    from baichuan2.align import logprobs

    hidden, weight = logprobs.hidden_and_head(model, ids, mask)
    hidden = hidden[:, :-1]
    logp = logprobs.token_logprobs(hidden, weight, ids[:, 1:])
    entropy = logprobs.token_entropy(hidden, weight) if with_entropy else None
    return logp, entropy


@dataclass
class Rollout:
    ids: torch.Tensor  # [b, t] prompt + response, right-padded
    attn: torch.Tensor  # [b, t] 1 = token
    mask: torch.Tensor  # [b, t-1] 1 where position j predicts a response token
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    stats: dict


def pack_rollout(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from baichuan2.eval.scoring import right_pad

    ids, attn = right_pad([list(p) + list(r) for p, r in zip(prompts, responses, strict=True)], pad)
    mask = torch.zeros((ids.shape[0], ids.shape[1] - 1))
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        mask[i, len(p) - 1: len(p) + len(r) - 1] = 1
    return ids, attn, mask


class ModelReward:
    """A trained reward model as a RewardFn: scores prompt + response (EOS-terminated), normalised."""

    def __init__(self, rm, eos_id: int, normalize: bool = True, batch_size: int = 16):
        self.rm, self.eos_id, self.normalize, self.batch_size = rm.eval(), eos_id, normalize, batch_size
        for p in rm.parameters():
            p.requires_grad_(False)

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        from baichuan2.align.reward import score_rows

        limit = self.rm.config.max_position_embeddings
        rows = [(p + r + ([] if r and r[-1] == self.eos_id else [self.eos_id]))[-limit:]
                for p, r in zip(prompts, responses, strict=True)]
        scores = score_rows(self.rm, rows, self.batch_size)
        return self.rm.normalize(scores) if self.normalize else scores


def ppo_optim(**changes) -> OptimArgs:
    """Baichuan 2's PPO optimiser: constant LR 5e-6 (no warm-up, no decay), gradient clip 0.5, no weight decay."""
    return dataclasses.replace(OptimArgs(lr=5e-6, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0,
                                         grad_clip=0.5), **changes)


class _Updater:
    """The engine's optimiser step (decay groups, clipping, constant LR) with its bad-step policy: a
    non-finite loss or gradient norm applies nothing; ``max_bad`` such updates in a row stop the run."""

    def __init__(self, model, optim: OptimArgs, iterations: int, max_bad: int, what: str):
        self.step = OptimizerStep(model, optim, iterations)
        self.guard = BadStepGuard(DivergenceArgs(loss_sigmas=0, grad_ratio=0), max_bad)
        self.what = what

    def __call__(self, loss: torch.Tensor, iteration: int) -> float:
        loss.backward()
        norm = self.step.clip()
        why = self.guard.verdict(float(loss.detach()), norm, not bool(torch.isfinite(loss)))
        self.guard.record(float(loss.detach()), norm, bool(why))
        if why:
            self.step.skip()
            if self.guard.streak >= self.guard.max_bad:
                raise PPOError(f"iteration {iteration}: {self.what} update: {why} ({self.guard.streak} in a row); "
                               "stopping before the update (lower the learning rate or check the reward model)")
            return norm
        self.step.apply(iteration)
        return norm


class PPOTrainer:
    """Holds the four models and two optimizers; ``iteration()`` does one rollout + update."""

    def __init__(self, actor, critic, reward_fn: RewardFn, tok, args: PPOArgs = PPOArgs(), reference=None,
                 optim: OptimArgs | None = None, fit_args: FitArgs | None = None):
        self.actor, self.critic, self.reward_fn, self.tok, self.args = actor, critic, reward_fn, tok, args
        self.reference = reference if reference is not None else copy.deepcopy(actor)
        self.reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        optim, fit_args = optim or ppo_optim(), fit_args or FitArgs(precision="fp32")
        self.optim = optim
        # Rollouts store the actor's weights in the decoding layout (``column_major_weights``: transposed
        # memory). Do it now, before the actor's optimiser holds any state: fused AdamW walks parameter,
        # gradient and moments as flat memory, so moments created (or restored on resume) in the old layout
        # would silently be paired with the wrong weight elements after the first rollout.
        column_major_weights(actor)
        self.actor_step = _Updater(actor, optim, args.iterations, fit_args.max_bad_steps, "policy")
        self.critic_step = _Updater(critic, dataclasses.replace(optim, lr=args.critic_lr or optim.lr), args.iterations,
                                    fit_args.max_bad_steps, "value")
        self.autocast = autocast_for(resolve_precision(fit_args.precision, actor.device), actor.device)
        self.pad = actor.config.pad_token_id or 0
        self.generator = torch.Generator(device=actor.device).manual_seed(args.seed)

    def modules(self) -> torch.nn.ModuleDict:
        """Actor and critic as one module (training-state checkpoints)."""
        return torch.nn.ModuleDict({"actor": self.actor, "critic": self.critic})

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.actor_step.step.optimizer, self.critic_step.step.optimizer]

    def sampling(self):
        from baichuan2.model.generate import SamplingConfig

        r = self.args.rollout
        return SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k,
                              top_p=r.top_p, do_sample=True, stop_token_ids=[self.tok.eos_id, self.tok.user_id])

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], iteration: int) -> Rollout:
        from baichuan2.model.generate import generate

        args, device = self.args, self.actor.device
        self.actor.eval()
        cfg = self.sampling()
        cfg.seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
        responses = generate(self.actor, prompts, cfg, include_stop=True)
        responses = [r or [self.tok.eos_id] for r in responses]
        ids, attn, mask = (t.to(device) for t in pack_rollout(prompts, responses, self.pad))
        with self.autocast:
            old_logp, entropy = token_logprobs(self.actor, ids, attn, with_entropy=True)
            ref_logp, _ = token_logprobs(self.reference, ids, attn)
            values = self.critic.values(ids, attn)[:, :-1].float()
        raw = self.reward_fn(prompts, responses).float().to(device)
        if not torch.isfinite(raw).all():
            raise PPOError(f"iteration {iteration}: the reward function returned non-finite scores")
        scores = raw.clamp(-args.reward_clip, args.reward_clip)
        beta = kl_coef(iteration, args.kl, args.iterations)
        rewards, kl = shaped_rewards(old_logp, ref_logp, scores, mask, beta)
        adv, returns = gae(rewards, values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            adv = masked_whiten(adv, mask)
        seq_kl = kl.sum(1)
        stats = {"score": float(raw.mean()), "score_std": float(raw.std()) if len(raw) > 1 else 0.0,
                 "kl": float(seq_kl.mean()), "kl_coef": beta, "non_score_reward": float((-beta * kl).sum(1).mean()),
                 "entropy": float(masked_mean(entropy, mask)), "response_length": float(mask.sum(1).mean()),
                 "value_mean": float(masked_mean(values, mask)), "return_mean": float(masked_mean(returns, mask)),
                 "ended_with_eos": float(sum(r[-1] == self.tok.eos_id for r in responses) / len(responses))}
        return Rollout(ids, attn, mask, old_logp, ref_logp, values, adv, returns, stats)

    def update(self, ro: Rollout, iteration: int) -> dict:
        args = self.args
        train_actor = iteration >= args.critic_warmup
        self.actor.train(train_actor)
        self.critic.train()
        sums: dict[str, list[float]] = {}
        order_rng = random.Random(args.seed * 1000003 + iteration)
        n = ro.ids.shape[0]
        for _ in range(args.ppo_epochs):
            order = list(range(n))
            order_rng.shuffle(order)
            for k in range(0, n, args.mini_batch_size):
                idx = torch.tensor(order[k: k + args.mini_batch_size], device=ro.ids.device)
                ids, attn, mask = ro.ids[idx], ro.attn[idx], ro.mask[idx]
                with self.autocast:
                    v = self.critic.values(ids, attn)[:, :-1].float()
                vloss, vstats = value_loss(v, ro.values[idx], ro.returns[idx], mask, args.value_clip)
                vnorm = self.critic_step(vloss, iteration)
                record = {"value_loss": float(vloss.detach()), "critic_grad_norm": vnorm, **vstats}
                if train_actor:
                    with self.autocast:
                        logp, _ = token_logprobs(self.actor, ids, attn)
                    ploss, pstats = policy_loss(logp, ro.old_logp[idx], ro.advantages[idx], mask, args.clip_ratio)
                    pnorm = self.actor_step(ploss, iteration)
                    record.update(policy_loss=float(ploss.detach()), actor_grad_norm=pnorm, **pstats)
                for key, val in record.items():
                    sums.setdefault(key, []).append(val)
        self.actor.eval()
        return {k: sum(v) / len(v) for k, v in sums.items()} | {"actor_updated": train_actor}

    def iteration(self, prompts: list[list[int]], iteration: int) -> dict:
        ro = self.rollout(prompts, iteration)
        stats = ro.stats | self.update(ro, iteration)
        if stats["kl"] > self.args.max_kl:
            raise PPOError(f"iteration {iteration}: mean KL to the reference is {stats['kl']:.2f} nats, above "
                           f"max_kl={self.args.max_kl} (KL blow-up); lower the learning rate or raise the KL "
                           "coefficient")
        return stats


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def encode_prompts(tok, conversations: Sequence[list[dict]], args: PPOArgs, context: int) -> list[list[int]]:
    from baichuan2.tokenizer.chat import build_chat_input

    r = args.rollout
    if r.max_new_tokens >= context:
        raise InputError(f"rollout.max_new_tokens={r.max_new_tokens} leaves no room for a prompt in the model's "
                         f"{context}-token context")
    budget = min(r.max_prompt_tokens, context - r.max_new_tokens)
    return [build_chat_input(tok, msgs, max_new_tokens=r.max_new_tokens, model_max_length=context,
                              max_input_tokens=budget) for msgs in conversations]


def plot_ppo(metrics: list[dict], path: str | Path) -> Path:
    """Score, KL and KL coefficient per iteration (the PPO reward curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [m["step"] for m in metrics]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(its, [m["score"] for m in metrics], label="reward score")
    a.set_xlabel("iteration"), a.set_ylabel("mean score"), a.set_title("PPO reward")
    warm = [m["step"] for m in metrics if not m.get("actor_updated")]
    if warm:
        a.axvspan(min(warm), max(warm), color="0.9", label="critic warm-up")
    a.legend()
    b.plot(its, [m["kl"] for m in metrics], label="KL to reference (nats/response)")
    b2 = b.twinx()
    b2.plot(its, [m["kl_coef"] for m in metrics], color="tab:orange", label="KL coefficient")
    b.set_xlabel("iteration"), b.set_title("KL")
    b.legend(loc="upper left"), b2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _save_state(run_dir: Path, iteration: int, trainer: PPOTrainer, rng: random.Random, order: list[int],
                keep_last: int) -> None:
    """Actor, critic, both optimisers (DCP), the prompt order and the sampling generator: a resumed run
    continues exactly where this one was."""
    from baichuan2.train import checkpoint as ckpt

    # an optimiser that has not stepped yet (the actor's during the critic warm-up) is left out: DCP would
    # initialise its state with a zero step, and the run would then differ from one never checkpointed
    stepped = [k for k, o in enumerate(trainer.optimizers()) if o.state]
    state = {"step": iteration, "order": order, "rng": _jsonable(rng.getstate()), "optimizers": stepped,
             "generator": trainer.generator.get_state().tolist()}
    ckpt.save_training_state(run_dir, iteration, trainer.modules(), [trainer.optimizers()[k] for k in stepped], state,
                             0, False, keep_last)


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _load_state(path: Path, trainer: PPOTrainer, rng: random.Random) -> tuple[int, list[int]]:
    from baichuan2.train import checkpoint as ckpt

    import json

    stepped = json.loads((Path(path) / "trainer.json").read_text(encoding="utf-8"))["optimizers"]
    state = ckpt.load_training_state(path, trainer.modules(), [trainer.optimizers()[k] for k in stepped], 0)
    rng.setstate(_tuples(state["rng"]))
    trainer.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
    return int(state["step"]), list(state["order"])


def ppo(actor, critic, reward_fn: RewardFn, tok, prompts: Sequence[list[dict]], out_dir: str | Path,
        args: PPOArgs = PPOArgs(), progress: bool = True, reference=None, optim: OptimArgs | None = None,
        fit_args: FitArgs | None = None, checkpoint: CheckpointArgs | None = None, resume: bool | str = False) -> dict:
    """Run PPO; save the actor (HF layout, chat generation defaults) to ``out_dir``; return a summary.

    ``out_dir-logs/`` gets metrics.jsonl (+ TensorBoard), ppo_result.json, ppo_curve.png and, every
    ``checkpoint.save_every`` iterations, training-state checkpoints (``resume`` continues from the latest).
    """
    from tqdm import tqdm

    from baichuan2.model.checkpoint import save_pretrained
    from baichuan2.model.generate import chat_generation_config
    from baichuan2.train import checkpoint as ckpt
    from baichuan2.utils.metrics import MetricsLogger, read_metrics

    optim, checkpoint = optim or ppo_optim(), checkpoint or CheckpointArgs()
    problems = [f"{k} must be >= 1, got {getattr(args, k)}" for k in
                ("iterations", "rollout_batch_size", "mini_batch_size", "ppo_epochs") if getattr(args, k) < 1]
    problems += [f"optim.{k} must be > 0, got {getattr(optim, k)}" for k in ("lr", "grad_clip")
                 if not getattr(optim, k) > 0]
    problems += [f"{k} must be > 0, got {getattr(args, k)}" for k in ("clip_ratio", "max_kl")
                 if not getattr(args, k) > 0]
    if problems:
        raise InputError("invalid PPO settings: " + "; ".join(problems))
    kl_coef(0, args.kl, args.iterations)  # an unknown schedule fails now, not after the first rollout
    context = actor.config.max_position_embeddings
    encoded = encode_prompts(tok, prompts, args, context)
    if not encoded:
        raise InputError("no prompts")
    out = Path(out_dir)
    logs = out.parent / f"{out.name}-logs"
    trainer = PPOTrainer(actor, critic, reward_fn, tok, args, reference=reference, optim=optim, fit_args=fit_args)
    def save(directory: Path) -> None:
        save_pretrained(actor, directory, tokenizer=tok, overwrite=True,
                        generation_config=chat_generation_config(tok, actor.config.pad_token_id or 0))

    rng = random.Random(args.seed)
    order: list[int] = []
    start_it = 0
    if resume:
        found = Path(resume) if isinstance(resume, str) else (ckpt.checkpoint_dirs(logs) or [None])[-1]
        if found is not None:
            start_it, order = _load_state(found, trainer, rng)
    if not start_it:
        (logs / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run
    logger = MetricsLogger(logs)
    logger.truncate_after(start_it - 1)  # iterations are logged 0-based; drop what a killed run wrote later
    start = time.time()
    bar = tqdm(total=args.iterations, initial=start_it, desc="ppo", unit="it", disable=not progress)
    try:
        for it in range(start_it, args.iterations):
            batch = []
            while len(batch) < args.rollout_batch_size:
                if not order:
                    order = list(range(len(encoded)))
                    rng.shuffle(order)
                batch.append(encoded[order.pop()])
            stats = trainer.iteration(batch, it)
            logger.log(it, **stats)
            bar.update(1)
            bar.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.3f}")
            if args.save_every and (it + 1) % args.save_every == 0:
                save(out.parent / f"{out.name}-iter{it + 1:05d}")
            if checkpoint.save_every and (it + 1) % checkpoint.save_every == 0 and it + 1 < args.iterations:
                _save_state(logs, it + 1, trainer, rng, order, checkpoint.keep_last)
    finally:
        bar.close()
        logger.close()
        metrics = read_metrics(logs / "metrics.jsonl") if (logs / "metrics.jsonl").exists() else []
        if metrics:
            plot_ppo(metrics, logs / "ppo_curve.png")
    save(out)
    first, last = metrics[: max(1, len(metrics) // 10)], metrics[-max(1, len(metrics) // 10):]
    summary = {"iterations": len(metrics), "seconds": round(time.time() - start, 1),
               "score_first_10pct": sum(m["score"] for m in first) / len(first),
               "score_last_10pct": sum(m["score"] for m in last) / len(last),
               "kl_last": metrics[-1]["kl"], "kl_max": max(m["kl"] for m in metrics),
               "settings": asdict(args), "optim": asdict(optim)}
    atomic_write_json(logs / "ppo_result.json", summary)
    return summary
