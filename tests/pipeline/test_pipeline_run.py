"""The one-command pipeline end to end at a reduced size, its resume after an interruption, its results
page in a real browser, and the scaling-law tooling."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from baichuan2.model.config import ModelConfig
from baichuan2.pipeline.page import fenced
from baichuan2.pipeline.run import PipelineRecipe, run_all
from baichuan2.pipeline.scaling import bootstrap_fits, fit_scaling_law, plan_ladder, prediction_interval
from baichuan2.pipeline.scaling_cli import LadderArgs, ladder_train
from baichuan2.utils.metrics import MetricsLogger, read_metrics
from tests.conftest import REPO, SHARED_DATA


def test_fit_recovers_a_known_law():
    c = np.logspace(15, 19, 6)
    loss = 2.0 * (c / 1e15) ** -0.12 + 1.7
    fit = fit_scaling_law(c, loss)
    assert abs(fit.b + 0.12) < 1e-3 and abs(fit.l_inf - 1.7) < 1e-2
    assert abs(fit.predict(1e20) - (2.0 * 1e5 ** -0.12 + 1.7)) < 1e-3


def test_bootstrap_interval_contains_the_truth_and_is_quick():
    rng = np.random.default_rng(1)
    c = np.logspace(15, 18, 5)
    loss = 0.5 * (c / 1e15) ** -0.3 + 3.0 + rng.normal(0, 0.003, 5)
    fit = fit_scaling_law(c, loss)
    t0 = time.process_time()
    fits = bootstrap_fits(fit, c, loss, samples=200)
    assert len(fits) >= 190 and time.process_time() - t0 < 30  # each refit starts from the fit
    lo, hi = prediction_interval(fit, c, loss, 1e19, fits=fits)
    assert lo < hi and lo - 0.05 < 0.5 * 1e4 ** -0.3 + 3.0 < hi + 0.05


def test_plan_counts_flops_like_the_trainer():
    (r,) = plan_ladder(["ladder-1m"], 256, 4096, tokens_per_param=0, min_tokens=1 << 20, max_tokens=1 << 20)
    cfg = ModelConfig.from_name("ladder-1m", vocab_size=4096, max_position_embeddings=256)
    assert r.tokens == 1 << 20 and r.flops == cfg.flops_per_token(256) * (1 << 20)


def test_metrics_log_resumes_without_losing_lines(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.log(step, loss=float(step))
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "lo')  # a kill mid-write
    resumed = MetricsLogger(tmp_path, tensorboard=False)  # the torn line is dropped, not fused with the next
    resumed.truncate_after(3)  # resuming from the step-3 checkpoint: 4 and 5 are written again
    resumed.log(4, loss=4.0)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_long_blank_runs_do_not_render_as_an_empty_block():
    block = fenced("def f():\n" + "\n" * 64 + "x = 1 ``` y")
    assert block.count("\n") < 8 and "65 (newlines)" in block and block.startswith("````")


SMALL = dict(code_bytes=200_000, docs_bytes=200_000, workers=1, embed_encoder="none", vocab_size=1024,
             release_every_tokens=40_000, bench_dir=str(SHARED_DATA / "bench"), eval_limit=1, sft_epochs=1,
             checkpoint_every=10, ladder=LadderArgs(tokens=81_920, seq_len=128, global_batch_tokens=2048,
                                                     train=ladder_train(micro_batch_size=8)))  # the default ladder, fewer tokens


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One uninterrupted run of the whole pipeline at a reduced size (one torch thread: on a shared
    machine two threads per process are much slower, and a subprocess below compares against it)."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    recipe = PipelineRecipe(out_dir=str(out), **SMALL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stages = run_all(recipe)
    finally:
        torch.set_num_threads(threads)
    return out, stages


# Minutes on an idle machine; a shared one can take several times longer (the fixture runs in the first test).
SLOW_TIMEOUT = pytest.mark.timeout(3600)


@pytest.mark.slow
@SLOW_TIMEOUT
def test_pipeline_end_to_end_small(small_run):
    out, stages = small_run
    threads = torch.get_num_threads()
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
    # Every released checkpoint scored (Figure 7): one row per distinct training step, the final release last
    # and the stage's headline numbers; the plot is on the page.
    rows = ev["checkpoints"]
    assert len(rows) >= 2 and rows[-1]["name"] == "final" and rows[-1]["heldout"] == ev["heldout"]
    assert [r["tokens"] for r in rows] == sorted(r["tokens"] for r in rows)
    assert rows[-1]["heldout"]["perplexity"] < rows[0]["heldout"]["perplexity"]
    plot = out / "eval" / "checkpoints" / "checkpoints.png"
    assert plot.stat().st_size > 10_000 and "checkpoints.png" in html and "| final | 81,920 |" in ev["table"]
    # A second run resumes: every stage is skipped and the results are unchanged; an eval stage cut short
    # continues from its per-question records.
    (out / "stages" / "eval.json").unlink()
    items = out / "eval" / "checkpoints" / rows[0]["name"] / "cmmlu" / "items.jsonl"
    lines = items.read_text().splitlines(keepends=True) if items.exists() else []
    if lines:
        items.write_text("".join(lines[: len(lines) // 2]) + lines[len(lines) // 2][:20])  # a kill mid-write
    torch.set_num_threads(1)
    try:
        again = run_all(PipelineRecipe(out_dir=str(out), **SMALL))
    finally:
        torch.set_num_threads(threads)
    assert again["scaling"] == stages["scaling"] and _numbers(again["eval"]) == _numbers(stages["eval"])
    if lines:  # the questions after the cut were scored again (the torn line stays, unread)
        records = [json.loads(x) for x in items.read_text().splitlines() if x.endswith("}")]
        assert len(records) == len(lines) and len({(r["subject"], r["index"]) for r in records}) == len(lines)


def _checkpoint_in(run_dir: Path) -> bool:
    return any((p / "trainer.json").exists() and not p.name.endswith(".tmp")
               for p in (run_dir / "checkpoints").glob("step-*"))


def _run_until(cmd: list[str], env: dict, ready, sig: int) -> subprocess.CompletedProcess:
    """Start cmd; send ``sig`` once ready() holds; return the finished process with its output."""
    # SIGINT back to its default in the child: a shell's background job (CI) starts with it ignored
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 900
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _numbers(stage: dict) -> dict:
    """A stage result without timings and paths (they differ between two run directories)."""
    return {k: v for k, v in stage.items() if k not in ("seconds", "run_dir", "release_dir", "figures")}


def _log(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s", "mfu", "step_time")}
            for r in read_metrics(path)]


@pytest.mark.slow
@SLOW_TIMEOUT
def test_interrupted_pipeline_resumes_to_identical_numbers(small_run, tmp_path):
    """Ctrl-C inside pretraining, kill -9 inside the scaling ladder, then the same command: the same
    final numbers as the uninterrupted run, and the same training logs (nothing lost, nothing twice)."""
    ref, ref_stages = small_run
    run = tmp_path / "run"
    for part in ("corpus", "data", "tokenizer", "split", "tokens", "tokens-val"):  # the cheap stages: reused
        shutil.copytree(ref / part, run / part)
    (run / "stages").mkdir()
    for stage in ("corpus", "data", "tokenizer", "tokens"):
        shutil.copy(ref / "stages" / f"{stage}.json", run / "stages")
    recipe = {k: v for k, v in json.loads((ref / "recipe.json").read_text()).items() if k != "out_dir"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"recipe": recipe}))
    cmd = [sys.executable, "-m", "baichuan2.cli", "pipeline", "--out_dir", str(run), "--config",
           str(tmp_path / "recipe.yaml"), "--until", "scaling"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}

    first = _run_until(cmd, env, lambda: _checkpoint_in(run / "pretrain"), signal.SIGINT)
    assert first.returncode == 130, first.stderr[-2000:]
    assert "Traceback" not in first.stderr and not (run / "stages" / "pretrain.json").exists()
    last = [line for line in first.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("pipeline: interrupted during pretrain") and "--until scaling" in last
    assert "interrupted during pretrain" in (run / "index.html").read_text()

    second_rung = ref_stages["scaling"]["rungs"][1]["name"]
    second = _run_until(cmd, env, lambda: _checkpoint_in(run / "scaling" / "rungs" / second_rung), signal.SIGKILL)
    assert second.returncode == -signal.SIGKILL and (run / "stages" / "pretrain.json").exists()
    main_model = next(line for line in second.stdout.splitlines() if line.startswith("pretraining "))
    assert not main_model.endswith("from step 0")  # pretraining resumed from its checkpoint
    assert not (run / "stages" / "scaling.json").exists()

    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=1800)
    stages = {k: json.loads((run / "stages" / f"{k}.json").read_text()) for k in ("pretrain", "scaling")}
    assert _numbers(stages["pretrain"]) == _numbers(ref_stages["pretrain"])
    assert _numbers(stages["scaling"]) == _numbers(ref_stages["scaling"])
    assert _log(run / "pretrain" / "metrics.jsonl") == _log(ref / "pretrain" / "metrics.jsonl")
    assert _log(run / "scaling" / "rungs" / second_rung / "metrics.jsonl") == \
        _log(ref / "scaling" / "rungs" / second_rung / "metrics.jsonl")


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.mark.slow
@SLOW_TIMEOUT
def test_results_page_in_headless_chromium(small_run, tmp_path):
    """The page loads in a real browser: every stage section, every image decoded (the eval stage's
    benchmarks-across-training curve too), Chinese drawn with a
    CJK font, links are links, the long-newline sample is not a tall blank block."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    out, stages = small_run
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.fail("Debian chromium and chromium-driver are required (.ci/run installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        driver.get((out / "index.html").as_uri())
        assert driver.title.startswith("Baichuan 2 pipeline") and "finished" in driver.title
        sections = [e.get_attribute("id") for e in driver.find_elements(By.CSS_SELECTOR, "section.stage")]
        assert sections == list(stages)
        images = driver.find_elements(By.TAG_NAME, "img")
        assert {Path(i.get_attribute("src")).name for i in images} >= {"loss.png", "scaling_law.png",
                                                                        "checkpoints.png"}
        assert all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 300", i)
                   for i in images)
        links = {a.get_attribute("href").split("/")[-1] for a in driver.find_elements(By.TAG_NAME, "a")}
        assert {"report.md", "metrics.jsonl", "scaling_fit.json"} <= links  # Markdown links became links
        assert "[data/report.md]" not in driver.find_element(By.TAG_NAME, "body").text
        zh = driver.find_element(By.XPATH, "//td[contains(., '你好')]")
        assert zh.size["width"] > 0 and zh.size["height"] > 0
        assert driver.execute_script("return document.fonts.check('16px \"Noto Sans CJK SC\"', '你好吗')")
        pre = driver.find_element(By.CSS_SELECTOR, "#sample pre")
        assert pre.size["height"] < 500 and pre.text.strip()
    finally:
        driver.quit()
