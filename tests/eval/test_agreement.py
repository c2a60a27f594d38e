"""Our MC harness on a converted Llama-family checkpoint (byte-level BPE, GQA, plain head) picks the same answer
as a plain-transformers computation of the same prompts, on every item, in both scoring modes; the letters
are scored as the tokenizer writes them after "Answer:" (" A", not "A"); BOS follows the tokenizer config.
lm-eval's ``hf`` model on a local task built from the same rows (``write_mmlu_tasks``) sees our prompts character
for character and gives the same scores. The SmolLM2 / lm-eval comparison on real weights (300 questions) is
benchmarks/eval_agreement.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from baichuan2.eval.harness import MCArgs, bos_prefix, build_prompt, evaluate_mc, letter_targets
from baichuan2.eval.tasks import LETTERS, Benchmark, load_benchmark
from tests.conftest import SHARED_DATA

MMLU = SHARED_DATA / "bench" / "mmlu"
SUBJECTS = ("astronomy", "marketing")
SHOTS = 2  # what fits the tiny model's 256-token context


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.model.convert import from_llama
    from baichuan2.tokenizer import Tokenizer
    from tests.tiny_llama import build_tiny_llama

    root = tmp_path_factory.mktemp("agree")
    build_tiny_llama(root / "hf")
    from_llama(str(root / "hf"), str(root / "ours"))
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    return load_pretrained(root / "ours", dtype="float32").eval(), Tokenizer.from_pretrained(root / "ours"), reference


def _small_mmlu():
    full = load_benchmark("mmlu", str(MMLU))  # cached and shared: build a new one, never mutate it
    return Benchmark("mmlu", {k: dataclasses.replace(full.subjects[k], test=full.subjects[k].test[:3])
                              for k in SUBJECTS})


@pytest.mark.skipif(not MMLU.is_dir(), reason="shared data not present")
@pytest.mark.parametrize("mode", ["letter", "loglik"])
def test_harness_picks_what_transformers_picks(converted, tmp_path, mode):
    model, tok, reference = converted
    bench = _small_mmlu()
    assert bos_prefix(tok) == []  # this tokenizer's config says add_bos_token: false
    res = evaluate_mc(model, tok, bench, MCArgs(shots=SHOTS, mode=mode, batch_size=4), tmp_path, progress=False)
    ours = {(r["subject"], r["index"]): r for r in map(json.loads, (tmp_path / "items.jsonl").read_text().splitlines())}
    limit = model.config.max_position_embeddings
    for s in bench.subjects.values():
        for it in s.test:
            probe = bench.prompt(s, [], it)
            # how the tokenizer writes each answer after "Answer:": " A" (here "Ġ" + "A", the shared "Ġ" first)
            answers = [tok.encode(probe + " " + L)[len(tok.encode(probe)):] for L in LETTERS[:4]]
            with torch.no_grad():
                if mode == "letter":
                    shared, letters = letter_targets(tok, probe, 4, " ")
                    assert [shared + [x] for x in letters] == answers
                    p = build_prompt(tok, bench, s, it, SHOTS, limit - len(shared))
                    logits = reference(torch.tensor([p.ids + shared])).logits[0, -1]
                    theirs = [float(v) for v in torch.log_softmax(logits, -1)[letters]]
                else:
                    p = build_prompt(tok, bench, s, it, SHOTS, limit - max(map(len, answers)))
                    theirs = []
                    for cont in answers:
                        logp = torch.log_softmax(reference(torch.tensor([p.ids + cont])).logits[0], -1)
                        theirs.append(sum(float(logp[len(p.ids) - 1 + j, t]) for j, t in enumerate(cont)))
            r = ours[(s.name, it.index)]
            assert r["pred"] == LETTERS[max(range(4), key=theirs.__getitem__)]
            assert r["scores"] == pytest.approx(theirs, abs=2e-3)
            assert r["shots"] == p.shots
    assert res["n"] == 6


@pytest.mark.skipif(not MMLU.is_dir(), reason="shared data not present")
def test_bos_choice_is_explicit_and_recorded(converted, tmp_path):
    model, tok, _ = converted
    bench = _small_mmlu()
    with_bos = evaluate_mc(model, tok, bench, MCArgs(shots=1, bos="true"), tmp_path / "bos", progress=False)
    assert with_bos["settings"]["bos"] is True and bos_prefix(tok, "true") == [tok.bos_id]
    s = bench.subjects["astronomy"]
    assert build_prompt(tok, bench, s, s.test[0], 1, 256, bos_prefix(tok, "true")).ids[0] == tok.bos_id
    with pytest.raises(ValueError, match="auto, true or false"):
        bos_prefix(tok, "yes")


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    """The tiny Llama with a 1024-token context, so few-shot MMLU prompts fit whole (at 256 tokens lm-eval would
    cut their start where we drop shots), as ours and as a transformers directory."""
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.model.convert import from_llama
    from baichuan2.tokenizer import Tokenizer
    from tests.tiny_llama import build_tiny_llama

    root = tmp_path_factory.mktemp("agree-long")
    build_tiny_llama(root / "hf")
    config = json.loads((root / "hf" / "config.json").read_text())
    (root / "hf" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    from_llama(str(root / "hf"), str(root / "ours"))
    return load_pretrained(root / "ours", dtype="float32").eval(), Tokenizer.from_pretrained(root / "ours"), root / "hf"


@pytest.mark.skipif(not MMLU.is_dir(), reason="shared data not present")
def test_lm_eval_hf_on_the_same_rows_sees_our_prompts_and_scores(long_context, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from baichuan2.eval.lm_eval_adapter import mc_samples, write_mmlu_tasks

    model, tok, hf_dir = long_context
    full = load_benchmark("mmlu", str(MMLU))
    bench = Benchmark("mmlu", {k: dataclasses.replace(full.subjects[k], test=full.subjects[k].test[:2])
                               for k in ("abstract_algebra", "world_religions")})  # the shortest prompts
    shots = 2
    evaluate_mc(model, tok, bench, MCArgs(shots=shots, mode="loglik", batch_size=4), tmp_path / "ours", progress=False)
    ours = {(r["subject"], r["index"]): r
            for r in map(json.loads, (tmp_path / "ours" / "items.jsonl").read_text().splitlines())}
    tasks = write_mmlu_tasks(bench, tmp_path / "tasks", shots)
    hf = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=4)
    res = lm_eval.simple_evaluate(model=hf, tasks=tasks, num_fewshot=shots, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")), verbosity="ERROR")
    theirs = mc_samples(res, tasks)
    assert set(theirs) == set(ours)
    limit = model.config.max_position_embeddings
    for s in bench.subjects.values():
        for it in s.test:
            context, lls = theirs[(s.name, it.index)]
            r = ours[(s.name, it.index)]
            assert r["shots"] == shots
            assert context == build_prompt(tok, bench, s, it, shots, limit, bos_prefix(tok)).text
            assert r["scores"] == pytest.approx(lls, abs=2e-3)
            assert r["pred"] == LETTERS[max(range(4), key=lls.__getitem__)]
    with pytest.raises(ValueError, match="MMLU's template"):
        write_mmlu_tasks(Benchmark("cmmlu", {}), tmp_path / "x")
