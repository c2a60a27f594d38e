"""The one-command pipeline end to end at a reduced size, and the scaling-law tooling."""

import json

import numpy as np
import pytest

from baichuan2.model.config import ModelConfig
from baichuan2.pipeline.run import PipelineRecipe, run_all
from baichuan2.pipeline.scaling import fit_scaling_law, plan_ladder
from baichuan2.pipeline.scaling_cli import LadderArgs
from baichuan2.utils.metrics import read_metrics
from tests.conftest import SHARED_DATA


def test_fit_recovers_a_known_law():
    c = np.logspace(15, 19, 6)
    loss = 2.0 * (c / 1e15) ** -0.12 + 1.7
    fit = fit_scaling_law(c, loss)
    assert abs(fit.b + 0.12) < 1e-3 and abs(fit.l_inf - 1.7) < 1e-2
    assert abs(fit.predict(1e20) - (2.0 * 1e5 ** -0.12 + 1.7)) < 1e-3


def test_plan_counts_flops_like_the_trainer():
    (r,) = plan_ladder(["ladder-1m"], 256, 4096, tokens_per_param=0, min_tokens=1 << 20, max_tokens=1 << 20)
    cfg = ModelConfig.from_name("ladder-1m", vocab_size=4096, max_position_embeddings=256)
    assert r.tokens == 1 << 20 and r.flops == cfg.flops_per_token(256) * (1 << 20)


@pytest.mark.slow
def test_pipeline_end_to_end_small(tmp_path):
    out = tmp_path / "run"
    recipe = PipelineRecipe(out_dir=str(out), code_bytes=200_000, docs_bytes=200_000, workers=1,
                            embed_encoder="none", vocab_size=1024, release_every_tokens=40_000,
                            bench_dir=str(SHARED_DATA / "bench"), eval_limit=1, sft_epochs=1,
                            ladder=LadderArgs(tokens=81_920, seq_len=128, global_batch_tokens=2048,
                                              micro_batch_size=8))  # the default ladder, fewer tokens
    stages = run_all(recipe)
    # Data: real duplicates found and removed, report written.
    assert stages["data"]["minhash"]["exact_dups"] > 0 and (out / "data" / "report.md").exists()
    assert stages["tokens"]["val_tokens"] > 0 and stages["tokens"]["tokens"] > 20 * stages["tokens"]["val_tokens"]
    assert 0 < stages["tokenizer"]["compression"]["all"]["tokens_per_char"] < 1
    # Pretraining: loss decreases, intermediate and final checkpoints released and loadable.
    losses = [m["loss"] for m in read_metrics(out / "pretrain" / "metrics.jsonl") if "loss" in m]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert len(stages["pretrain"]["releases"]) >= 2
    # Scaling: bigger models reach lower loss; the fit's exponent is negative; a prediction was checked.
    fit = json.loads((out / "scaling" / "scaling_fit.json").read_text())
    assert fit["fit"]["b"] < 0 and np.isfinite(fit["relative_error"]) and fit["loss_key"] == "val_loss"
    assert (out / "scaling" / "scaling_law.png").stat().st_size > 10_000
    # The checkpoint generates tokens; the summary embeds the plots.
    assert stages["sample"]["new_tokens"] > 0
    html = (out / "index.html").read_text()
    assert "loss.png" in html and "scaling_law.png" in html and (out / "loss.png").exists()
    # SFT: the assistant loss on held-out dialogues drops; the chat model answers; the summary says how to chat.
    assert stages["sft"]["val_loss_after"] < stages["sft"]["val_loss_before"]
    assert len(stages["sft"]["answers"]) == 2 and "baichuan2 chat" in html
    # Evaluation: held-out perplexity below the uniform 1024, and a 5-shot slice when the benchmark files exist.
    ev = stages["eval"]
    assert 1 < ev["heldout"]["perplexity"] < 1024 and ev["heldout"]["bits_per_byte"] > 0
    if (SHARED_DATA / "bench" / "cmmlu").exists():
        assert ev["cmmlu"]["n"] == 67 and 0 <= ev["cmmlu"]["accuracy"] <= 100 and ev["mmlu"]["n"] == 57
    assert "held-out perplexity" in html
    # A second run resumes: every stage is skipped and the results are unchanged.
    again = run_all(recipe)
    assert again["scaling"] == stages["scaling"]
