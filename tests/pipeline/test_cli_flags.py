"""A flag on the command line wins over a --config recipe, whatever the order they were typed in."""

import pytest

import baichuan2.pipeline.run as pipeline_run
from baichuan2.cli import configs_first, main
from tests.conftest import REPO

RECIPE = str(REPO / "src" / "baichuan2" / "recipes" / "pipeline-default.yaml")


@pytest.mark.parametrize("argv", [
    ["--out_dir", "mine", "--config", RECIPE, "--recipe.vocab_size", "512"],
    ["--config", RECIPE, "--out_dir", "mine", "--recipe.vocab_size", "512"],
    ["--recipe.vocab_size", "512", "--out_dir", "mine", f"--config={RECIPE}"],
    ["--recipe.out_dir", "mine", "--recipe.vocab_size", "512", "--config", RECIPE],
])
def test_pipeline_flags_win_over_the_recipe(monkeypatch, argv):
    seen = []
    monkeypatch.setattr(pipeline_run, "run_all", lambda recipe, until="": seen.append(recipe))
    main(["pipeline", *argv])
    (recipe,) = seen
    assert recipe.out_dir == "mine" and recipe.vocab_size == 512
    assert recipe.ladder.target == "ladder-500k"  # the rest still comes from the recipe


def test_pipeline_default_run_directory(monkeypatch):
    seen = []
    monkeypatch.setattr(pipeline_run, "run_all", lambda recipe, until="": seen.append(recipe))
    main(["pipeline", "--config", RECIPE])
    main(["pipeline"])
    assert [r.out_dir for r in seen] == ["runs/pipeline", "runs/pipeline"]


def test_configs_move_after_the_sub_verb_only():
    args = ["train", "in.jsonl", "out", "--vocab_size", "512", "--config", "a.yaml", "--config=b.yaml"]
    assert configs_first(args, {"train": None}) == ["train", "--config", "a.yaml", "--config=b.yaml", "in.jsonl",
                                                    "out", "--vocab_size", "512"]
    assert configs_first(["--x", "1"], ()) == ["--x", "1"]


def test_a_shortened_flag_is_refused_not_guessed(monkeypatch, capsys):
    # argparse would take `--ladder.lr` for the only field it prefixes (lr_width_exponent): a renamed
    # field must be refused, not silently set something else.
    monkeypatch.setattr(pipeline_run, "run_all", lambda recipe, until="": pytest.fail("ran"))
    with pytest.raises(SystemExit):
        main(["pipeline", "--recipe.ladder.lr", "0.1"])
    assert "unrecognized arguments: --recipe.ladder.lr" in capsys.readouterr().err
