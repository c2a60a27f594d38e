"""`baichuan2 ppo`: PPO against a trained reward model with Baichuan 2's settings."""

from __future__ import annotations

from baichuan2.align.ppo import PPOArgs, ppo_optim
from baichuan2.train.engine import CheckpointArgs, FitArgs
from baichuan2.train.optim import OptimArgs
from baichuan2.utils.io import as_paths


def run(checkpoint: str, reward_model: str, prompts: str | list[str], out_dir: str = "runs/ppo", args: PPOArgs = PPOArgs(),
        optim: OptimArgs = ppo_optim(), train: FitArgs = FitArgs(precision="fp32"),
        checkpointing: CheckpointArgs = CheckpointArgs(), resume: bool | str = False, critic: str = "",
        limit: int = 0, dtype: str = "float32", device: str = "auto") -> None:
    """Optimise CHECKPOINT (the actor, usually the SFT model) against REWARD_MODEL with PPO.

    Four models: the actor; a frozen copy of it as the KL reference; the frozen reward model (one score
    per response, normalised to its training distribution and clipped); a critic with per-token values,
    initialised from the reward model unless --critic is given. Defaults are Baichuan 2's: 350
    iterations, critic-only warm-up for 20 iterations, lr 5e-6, gradient clip 0.5, PPO clip 0.1, KL
    coefficient 0.2 -> 0.005 (--args.kl.schedule cosine|linear|exponential|constant). Stops with a clear
    message on non-finite numbers or when the KL to the reference exceeds --args.max_kl.

    Writes the actor to OUT_DIR (HF layout, chat defaults) and OUT_DIR-logs/ with metrics.jsonl
    (score, KL, KL coefficient, entropy, value/policy loss, clip fraction, response length), TensorBoard
    scalars, ppo_curve.png and ppo_result.json.

    Args:
        checkpoint: Actor / reference model directory (HF layout with tokenizer).
        reward_model: Reward-model directory from `baichuan2 rm train`.
        prompts: Prompt files: JSON/JSONL with messages, conversations, prompt, question (BELLE),
            instruction or preference pairs (their prompts).
        out_dir: Output actor checkpoint.
        args: PPO settings.
        optim: AdamW settings of actor and critic (Baichuan 2: constant lr 5e-6, clip 0.5; shared by every verb).
        train: Precision and the bad-step policy (max_bad_steps) of the engine (shared by every verb).
        checkpointing: Training-state checkpoints every save_every iterations in OUT_DIR-logs/checkpoints.
        resume: true to continue from the latest checkpoint in OUT_DIR-logs (the same results as an
            uninterrupted run), or a checkpoint directory.
        critic: Critic initialisation (a reward-model directory); default: the reward model.
        limit: Use only the first N prompts (0 = all).
        dtype: Weights' dtype for training.
        device: auto | cpu | cuda | cuda:N.
    """
    from baichuan2.align.ppo import ModelReward, PPOError, ppo
    from baichuan2.align.preference import read_prompts
    from baichuan2.align.reward import RewardModel
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(checkpoint)
    actor = load_pretrained(checkpoint, dtype=dtype, device=device)
    rm = RewardModel.load(reward_model, dtype=dtype, device=str(actor.device))
    if rm.config.vocab_size != actor.config.vocab_size:
        raise SystemExit(f"ppo: the reward model's vocabulary ({rm.config.vocab_size}) differs from the actor's "
                         f"({actor.config.vocab_size}); both must share the tokenizer")
    value_model = RewardModel.load(critic or reward_model, dtype=dtype, device=str(actor.device))
    conversations = [msgs for msgs, _ in read_prompts(as_paths(prompts))]
    conversations = conversations[:limit] if limit else conversations
    try:
        s = ppo(actor, value_model, ModelReward(rm, tok.eos_id, args.normalize_reward), tok, conversations, out_dir,
                args, optim=optim, fit_args=train, checkpoint=checkpointing, resume=resume)
    except PPOError as e:
        raise SystemExit(f"ppo stopped: {e}") from None
    print(f"ppo: {s['iterations']} iterations in {s['seconds']} s; mean score {s['score_first_10pct']:.3f} "
          f"(first 10%) -> {s['score_last_10pct']:.3f} (last 10%); KL {s['kl_last']:.3f} nats; saved {out_dir}")


COMMANDS = run
