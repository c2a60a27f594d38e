"""The scaling ladder's recipe: the shared optimiser/engine blocks (``ladder.optim``, ``ladder.train``) give
every rung the settings the shipped recipes always gave, and settings the ladder owns are refused in one line."""

from __future__ import annotations

import pytest

from baichuan2.cli import main, recipe_parser
from baichuan2.pipeline.scaling_cli import LadderArgs, plan_rungs, rung_config
from baichuan2.train.optim import OptimArgs
from tests.conftest import REPO

RECIPES = REPO / "src" / "baichuan2" / "recipes"
# what the ladder recipe gave each rung before it used the shared blocks (LadderArgs.lr / warmup_frac /
# micro_batch_size / precision / seed): 1.2M tokens / 1,024 per step; 10% warm-up; lr 2e-2 x 16 / hidden
STEPS, WARMUP = 1171, 117
PEAK_LR = {"ladder-10k": 0.02, "ladder-20k": 0.02 * 16 / 24, "ladder-50k": 0.01, "ladder-100k": 0.02 * 16 / 48,
           "ladder-200k": 0.005, "ladder-500k": 0.02 * 16 / 96}


def _ladder(args: list[str], verb: str = "scaling", sub: str | None = "run") -> LadderArgs:
    parser = recipe_parser(verb, sub)
    cfg = parser.instantiate(parser.parse_args(args))
    return cfg.ladder if verb == "scaling" else cfg.recipe.ladder


@pytest.mark.parametrize("recipe", ["scaling-ladder.yaml", "pipeline-default.yaml"])
def test_shipped_recipes_give_every_rung_the_same_settings_as_before(recipe):
    if recipe == "scaling-ladder.yaml":
        ladder = _ladder([f"--config={RECIPES / recipe}", "runs/tokens"])
    else:
        ladder = _ladder([f"--config={RECIPES / recipe}"], "pipeline", None)
    assert ladder == LadderArgs()  # the recipes spell out the defaults
    rungs, target = plan_rungs(ladder, 4096)
    assert [r.preset for r in [*rungs, target]] == list(PEAK_LR)
    for rung in [*rungs, target]:
        cfg = rung_config(ladder, rung, "shards", "run", evals=12)
        assert cfg.optim == OptimArgs(lr=pytest.approx(PEAK_LR[rung.preset], rel=1e-12), warmup_steps=WARMUP)
        t = cfg.train
        assert (t.max_steps, t.global_batch_tokens, t.micro_batch_size, t.precision, t.seed) == \
            (STEPS, 1024, 4, "auto", 0)
        assert (t.log_every, t.eval_every, t.stop_after) == (STEPS // 50, STEPS // 12, 0)


def test_ladder_flags_reach_every_rung_through_the_shared_blocks():
    ladder = _ladder(["runs/tokens", "--ladder.vocab_size=4096", "--ladder.optim.lr=1e-2",
                      "--ladder.optim.warmup_frac=0.2", "--ladder.optim.grad_clip=1.0", "--ladder.train.seed=3",
                      "--ladder.train.precision=bf16", "--ladder.train.micro_batch_size=0",
                      "--ladder.train.max_bad_steps=7", "--ladder.lr_width_exponent=0"])
    rungs, target = plan_rungs(ladder, 4096)
    for rung in [*rungs, target]:
        cfg = rung_config(ladder, rung, "shards", "run")
        assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.warmup_frac, cfg.optim.grad_clip) == \
            (1e-2, int(0.2 * STEPS), 0.0, 1.0)
        t = cfg.train
        # micro_batch_size 0 = the whole batch in one pass (FitArgs' meaning): 1,024 tokens / 256 = 4 rows
        assert (t.seed, t.precision, t.micro_batch_size, t.max_bad_steps) == (3, "bf16", 4, 7)


@pytest.mark.parametrize("flag", ["--ladder.train.eval_every=5", "--ladder.train.log_every=2",
                                  "--ladder.train.stop_after=10"])
def test_settings_the_ladder_sets_per_rung_are_refused_in_one_line(flag, capsys):
    key = flag.split("=")[0][2:]
    with pytest.raises(SystemExit) as stop:
        main(["scaling", "plan", "--ladder.vocab_size=4096", flag])
    assert str(stop.value) == (f"baichuan2 scaling: error: {key}: set per rung by the ladder (logging ~50 times, "
                               "evaluating at the last step); leave unset")
    assert capsys.readouterr().out == ""  # nothing planned


def test_a_recipe_with_the_old_ladder_fields_is_refused(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("ladder:\n  lr: 0.02\n  warmup_frac: 0.1\n")
    with pytest.raises(SystemExit) as stop:
        main(["scaling", "plan", f"--config={old}", "--ladder.vocab_size=4096"])
    assert stop.value.code == 2  # the parser's error: unknown key ladder.lr
