"""Evaluation: exact templates, the real benchmark files, scoring against hand computation, resume, lm-eval."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from baichuan2.eval.bbh import extract_answer, load_bbh, parse_cot_prompt
from baichuan2.eval.harness import MCArgs, build_prompt, evaluate_mc, letter_token_ids
from baichuan2.eval.perplexity import perplexity
from baichuan2.eval.scoring import continuation_logprobs, letter_logprobs
from baichuan2.eval.tasks import Item, Subject, ceval_prompt, cmmlu_prompt, load_benchmark, mmlu_prompt, split_options
from baichuan2.utils.io import InputError
from tests.conftest import shared_path
from tests.serve.conftest import checkpoint  # noqa: F401  (the tiny model + tokenizer fixture)

SHOT = Item("1+1=?", ["1", "2", "3", "4"], "B")
TEST = Item("2+2=?", ["4", "5", "6", "7"], "A")


def test_templates_match_the_reference_scripts():
    mmlu = Subject("college_math", " college math", "STEM")
    assert mmlu_prompt(mmlu, [SHOT], TEST) == (
        "The following are multiple choice questions (with answers) about  college math.\n\n"
        "1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:")
    cm = Subject("agronomy", "农学", "Other")
    assert cmmlu_prompt(cm, [SHOT], TEST) == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案是：B\n\n"
        "题目：2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\n答案是：")
    ce = Subject("accountant", "注册会计师", "Other")
    assert ceval_prompt(ce, [SHOT, SHOT], TEST) == (
        "以下是中国关于注册会计师考试的单项选择题，请选出其中的正确答案。\n"
        "\n1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B"
        "\n1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B"
        "\n2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\n答案：")
    assert ceval_prompt(ce, [], TEST).startswith("以下是中国关于注册会计师考试的单项选择题，请选出其中的正确答案。\n\n2+2")


def test_gaokao_options_are_parsed_from_the_question_text():
    stem, opts = split_options("1．（4分）下列说法正确的是（ ）\nA．甲  B．乙\nC．丙 D．丁\n")
    assert stem == "1．（4分）下列说法正确的是（ ）" and opts == ["甲", "乙", "丙", "丁"]
    assert split_options("没有选项的题目") is None
    assert split_options("A．x B．y D．z") is None


@pytest.mark.parametrize("name,folder,subjects,items", [
    ("cmmlu", "cmmlu", 67, 11582), ("mmlu", "mmlu", 57, 14079), ("gaokao", "gaokao-bench", 5, 1000),
    ("agieval", "agieval", 10, 3000)])
def test_real_benchmark_files_parse(name, folder, subjects, items):
    bench = load_benchmark(name, str(shared_path("bench", folder)))
    assert len(bench.subjects) >= subjects and bench.num_items >= items
    if name in ("cmmlu", "mmlu"):
        assert len(bench.subjects) == subjects and bench.num_items == items
    for s in bench.subjects.values():
        assert len(s.dev) >= 5 and s.test
        for it in s.dev + s.test:
            assert it.answer in "ABCDE"[: len(it.choices)] and len(it.choices) >= 4 and all(it.choices)
    s = next(iter(bench.subjects.values()))
    assert bench.prompt(s, s.dev[:5], s.test[0]).count("\nA. ") == 6


def test_real_bbh_files_parse():
    tasks = load_bbh(shared_path("bench", "bbh"))
    assert len(tasks) == 27 and sum(len(t.examples) for t in tasks.values()) == 6511
    assert all(len(t.shots) == 3 and t.description for t in tasks.values())
    assert tasks["boolean_expressions"].shots[0][1] == "False"
    assert tasks["date_understanding"].shots[0][1] == "(D)"
    assert tasks["boolean_expressions"].prompt("True is").endswith("A: True\n\nQ: True is\nA:")


def test_bbh_prompt_parsing_and_answer_extraction():
    text = "canary\n-----\nDo the task.\n\nQ: q1\nA: Let's think.\nSo the answer is (B).\n\nQ: q2\nA: x. So the answer is 7."
    desc, shots = parse_cot_prompt(text)
    assert desc == "Do the task." and shots == [("q1", "(B)"), ("q2", "7")]
    assert extract_answer(" (A)\n\nQ: next") == "(A)" and extract_answer(" 12\nQ: more") == "12"
    with pytest.raises(InputError):
        parse_cot_prompt("no exemplars here")


@pytest.fixture(scope="module")
def tiny(checkpoint):  # noqa: F811
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer

    return load_pretrained(checkpoint).eval(), Tokenizer.from_pretrained(checkpoint)


def test_letter_scores_equal_a_hand_computation(tiny):
    model, tok = tiny
    prompts = [[tok.bos_id] + tok.encode(t) for t in ("题目：1+1=?\n答案是：", "Answer:", "a much longer prompt, with words\nAnswer:")]
    letters = letter_token_ids(tok, 4)
    batched = letter_logprobs(model, prompts, letters, batch_size=3)
    for p, row in zip(prompts, batched, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([p])).logits[0, -1].float()
        assert torch.allclose(row, torch.log_softmax(logits, -1)[letters], atol=1e-4)


def test_continuation_scores_equal_a_hand_computation(tiny):
    model, tok = tiny
    pairs = [([tok.bos_id] + tok.encode("The answer is"), tok.encode(" B")),
             ([tok.bos_id] + tok.encode("x"), tok.encode(" a longer continuation"))]
    got = continuation_logprobs(model, pairs, batch_size=2)
    for (ctx, cont), (lp, greedy) in zip(pairs, got, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
        want = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert lp == pytest.approx(want, abs=1e-3)
        assert greedy == all(logp[len(ctx) - 1 + i].argmax().item() == t for i, t in enumerate(cont))


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_a_shared_prompt_prefix_runs_once_with_the_same_scores(position):
    """Rows sharing a few-shot prefix (run once, keys/values copied to every row) score as if run alone,
    with padding in the batch and rows whose reads start right after the prefix."""
    from baichuan2.eval import scoring
    from baichuan2.model import Baichuan, ModelConfig

    torch.manual_seed(0)
    model = Baichuan(ModelConfig.from_name(f"tiny-{position}", vocab_size=64, max_position_embeddings=128)).eval()
    prefix = torch.randint(1, 64, (40,)).tolist()
    tails = [[5], [7, 9, 11], torch.randint(1, 64, (17,)).tolist()]
    prompts = [prefix + t for t in tails]
    assert scoring.shared_prefix(prompts, 100) == 40 and scoring.shared_prefix(prompts, 12) == 12
    with torch.no_grad():
        alone = [torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1) for p in prompts]
    letters = [3, 4, 5, 6]
    got = scoring.letter_logprobs(model, prompts, letters, batch_size=3)
    for row, logp, p in zip(got, alone, prompts, strict=True):
        assert torch.allclose(row, logp[len(p) - 1, letters], atol=1e-4)
    pairs = [(p, [8, 9]) for p in prompts] + [(prefix, [1, 2, 3])]
    got = scoring.continuation_logprobs(model, pairs, batch_size=4)
    for (ctx, cont), (lp, _) in zip(pairs, got, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
        assert lp == pytest.approx(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)), abs=1e-4)


def test_perplexity_equals_exp_mean_nll(tiny):
    model, tok = tiny
    text = "Hello, how are you today? I am fine, thank you."
    res = perplexity(model, tok, [text], bos="true")
    ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    nll = -sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    assert res["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-3)
    assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-3)


def _write_cmmlu(root, n_test=6):
    for split, n in (("dev", 5), ("test", n_test)):
        (root / "data" / split).mkdir(parents=True, exist_ok=True)
        for subject in ("agronomy", "virology"):
            with open(root / "data" / split / f"{subject}.csv", "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                for i in range(n):
                    w.writerow([i, f"{subject} 问题 {i}", "甲", "乙", "丙", "丁", "ABCD"[i % 4]])


@pytest.mark.parametrize("mode", ["letter", "loglik"])
def test_evaluate_aggregates_and_resumes(tiny, tmp_path, mode):
    model, tok = tiny
    _write_cmmlu(tmp_path / "cmmlu")
    bench = load_benchmark("cmmlu", str(tmp_path / "cmmlu"))
    assert bench.subjects["agronomy"].display == "农学" and bench.subjects["virology"].category == "STEM"
    out = tmp_path / "out"
    res = evaluate_mc(model, tok, bench, MCArgs(shots=5, mode=mode, batch_size=4), out, progress=False)
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 12 and res["n"] == 12
    assert res["accuracy"] == pytest.approx(100 * sum(r["correct"] for r in items) / 12)
    assert set(res["categories"]) == {"Other", "STEM"}
    # The prediction is the argmax of the stored scores, and letter-mode scores are the hand-computed ones.
    for r in items:
        assert r["pred"] == "ABCD"[max(range(4), key=r["scores"].__getitem__)]
    if mode == "letter":
        s = bench.subjects["agronomy"]
        p = build_prompt(tok, bench, s, s.test[0], 5, model.config.max_position_embeddings)
        assert items[0]["shots"] == p.shots and res["fewer_shots"] == sum(r["shots"] < 5 for r in items)
        direct = letter_logprobs(model, [p.ids], letter_token_ids(tok, 4, p.text))[0].tolist()
        assert items[0]["scores"] == pytest.approx(direct, abs=1e-3)
    # Interrupted run: drop half the cached lines and cut one in the middle; only those are scored again.
    lines = (out / "items.jsonl").read_text().splitlines()
    (out / "items.jsonl").write_text("\n".join(lines[:6]) + "\n" + lines[6][:10])
    again = evaluate_mc(model, tok, bench, MCArgs(shots=5, mode=mode, batch_size=4), out, progress=False)
    assert again["accuracy"] == res["accuracy"] and again["subjects"] == res["subjects"]


def test_prompts_longer_than_the_context_drop_shots(tiny, tmp_path, capsys):
    model, tok = tiny
    _write_cmmlu(tmp_path / "cmmlu")
    bench = load_benchmark("cmmlu", str(tmp_path / "cmmlu"))
    s = bench.subjects["agronomy"]
    full = build_prompt(tok, bench, s, s.test[0], 5, 10_000, [tok.bos_id])
    short = build_prompt(tok, bench, s, s.test[0], 5, len(full.ids) - 1, [tok.bos_id])
    assert full.shots == 5 and short.shots < 5 and short.ids[0] == tok.bos_id
    assert len(short.ids) < len(full.ids) and tok.decode(short.ids[1:]).count("题目：") == short.shots + 1
    assert tok.decode(short.ids[1:]).endswith("答案是：")
    # eval mc records the shots really used (here the 192-token context holds fewer than 5) and warns
    res = evaluate_mc(model, tok, bench, MCArgs(shots=5), tmp_path / "out", progress=False)
    items = [json.loads(line) for line in (tmp_path / "out" / "items.jsonl").read_text().splitlines()]
    assert res["fewer_shots"] == sum(r["shots"] < 5 for r in items) > 0
    assert res["subjects"]["agronomy"]["min_shots"] < 5 and res["mean_shots"] < 5
    assert f"{res['fewer_shots']} of 12 questions got fewer than 5 shots" in capsys.readouterr().err
    assert evaluate_mc(model, tok, bench, MCArgs(shots=0), tmp_path / "zero", progress=False)["fewer_shots"] == 0


def test_bad_benchmark_directories_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_benchmark("mmlu", str(tmp_path / "missing"))
    (tmp_path / "data" / "dev").mkdir(parents=True)
    (tmp_path / "data" / "test").mkdir(parents=True)
    (tmp_path / "data" / "dev" / "x.csv").write_text(",Question,A,B,C,D,Answer\n")
    (tmp_path / "data" / "test" / "x.csv").write_text(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,Z\n")
    with pytest.raises(InputError, match="answer 'Z' is not one of ABCD"):
        load_benchmark("cmmlu", str(tmp_path))
    (tmp_path / "data" / "test" / "x.csv").write_text(",Question,A,B,C,D,Answer\n0,q,a,b\n")
    with pytest.raises(InputError, match="x.csv:1: expected question, 4 options and an answer"):
        load_benchmark("cmmlu", str(tmp_path / "data" / ".." / "."))


def test_lm_eval_adapter_through_the_harness_interface(tiny):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from baichuan2.eval.lm_eval_adapter import Baichuan2LM

    model, tok = tiny
    lm = Baichuan2LM(model=model, tokenizer=tok, batch_size=4)
    reqs = [Instance("loglikelihood", {}, ("Question: 1+1=?\nAnswer:", " B"), 0),
            Instance("loglikelihood", {}, ("你好", "，世界"), 1),
            Instance("loglikelihood", {}, ("", "hello"), 2)]
    got = lm.loglikelihood(reqs)
    ctx, cont = lm._encode_pair("Question: 1+1=?\nAnswer:", " B")
    assert got[0][0] == pytest.approx(continuation_logprobs(model, [(ctx, cont)])[0][0], abs=1e-4)
    assert all(lp < 0 for lp, _ in got)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("some text to score",), 0)])
    res = perplexity(model, tok, ["some text to score"])
    assert -rolling[0] == pytest.approx(res["nll_per_token"] * (res["tokens"] - 1), rel=0.2)
    outs = lm.generate_until([Instance("generate_until", {}, ("Q: hi\nA:", {"until": ["\n"], "max_gen_toks": 8}), 0)])
    assert isinstance(outs[0], str) and "\n" not in outs[0]
    # requests are generated in batches; each gets what it would get alone
    gen = [Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 6}), i)
           for i, c in enumerate(["Q: hi\nA:", "Hello", "A longer question about cats?"])]
    assert lm.generate_until(gen) == [lm.generate_until([g])[0] for g in gen]
    # BOS follows the tokenizer config (false here, as for Baichuan 2) unless asked for
    assert lm.tok_encode("Hello") == tok.encode("Hello") and lm.prefix_token_id == tok.eos_id
    with_bos = Baichuan2LM(model=model, tokenizer=tok, add_bos_token="true")
    assert with_bos.tok_encode("Hello") == [tok.bos_id] + tok.encode("Hello") and with_bos.prefix_token_id == tok.bos_id
    from lm_eval.api.registry import get_model

    assert get_model("baichuan2") is Baichuan2LM


def test_eval_cli_runs_end_to_end(checkpoint, tmp_path, capsys):  # noqa: F811
    from baichuan2.cli import main

    _write_cmmlu(tmp_path / "cmmlu")
    main(["eval", "mc", str(checkpoint), "cmmlu", str(tmp_path / "cmmlu"), "--out_dir", str(tmp_path / "out"),
          "--settings.limit", "3"])
    out = capsys.readouterr().out
    assert "cmmlu:" in out and "(micro, 6 questions)" in out
    main(["eval", "compare", str(tmp_path / "out")])
    assert "57.07" in capsys.readouterr().out
