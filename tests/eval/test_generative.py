"""Generative benchmarks: GSM8K, MATH, HumanEval, MBPP — prompts, answer extraction, pass@k, batched
generation equal to one-at-a-time generation, resume, and the CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from baichuan2.eval import code, gsm8k, minerva_math
from baichuan2.eval.generation import GenArgs, generate_until, stop_at
from baichuan2.eval.sandbox import Limits
from baichuan2.utils.io import InputError
from tests.conftest import SHARED_DATA
from tests.serve.conftest import checkpoint  # noqa: F401  (the tiny model + tokenizer fixture)

GSM8K = SHARED_DATA / "bench" / "gsm8k" if (SHARED_DATA / "bench" / "gsm8k").is_dir() else None
MBPP = SHARED_DATA / "bench" / "mbpp" / "mbpp.jsonl" if (SHARED_DATA / "bench" / "mbpp").is_dir() else None
FAST = Limits(timeout=5.0, cpu_seconds=5)


@pytest.fixture(scope="module")
def tiny(checkpoint):  # noqa: F811
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer

    return load_pretrained(checkpoint).eval(), Tokenizer.from_pretrained(checkpoint)


# ---- GSM8K ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("She pays 5 + 3 = 8 dollars.\nThe answer is 8", "8"),
    ("so 1,200 - 200 = 1,000.\nThe answer is $1,000.", "1000"),
    ("The total is 18 dollars.", "18"),
    ("#### 72", "72"),
    ("It is 2.50 per hour... The answer is 7.5 hours.\n\nQuestion: next one has 99", "7.5"),
    ("The answer is -3", "-3"),
    ("no number here", None),
])
def test_gsm8k_answer_extraction(text, want):
    assert gsm8k.extract_answer(text) == want


@pytest.mark.skipif(GSM8K is None, reason="shared data not present")
def test_gsm8k_real_files_and_prompt():
    train, test = gsm8k.load_split(GSM8K / "train.jsonl"), gsm8k.load_split(GSM8K / "test.jsonl")
    assert (len(train), len(test)) == (7473, 1319)
    prompt = gsm8k.build_prompt(train[:4], test[0]["question"])
    assert prompt.count("Question: ") == 5 and prompt.count("Let's think step by step\nAnswer:\n") == 5
    assert prompt.endswith("Let's think step by step\nAnswer:\n") and "<<" not in prompt
    assert "Natalia sold 48/2 = 24 clips in May." in prompt and "The answer is 72\n\n" in prompt
    assert all(gsm8k.reference_answer(r["answer"]) for r in test)
    assert gsm8k.reference_answer(test[0]["answer"]) == "18"


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    model, tok = tiny
    prompts = [tok.encode(t) for t in ("Question: how are you?\nAnswer:", "Hi", "Tell me a long story about a cat",
                                       "What is two plus two?")]
    stop = stop_at(["\n\n", "Question:"])
    batched = generate_until(model, tok, prompts, 24, stop, batch_size=4)
    single = [generate_until(model, tok, [p], 24, stop, batch_size=1)[0] for p in prompts]
    assert batched == single
    # the stop condition cuts the text; without it the completion runs on
    free = generate_until(model, tok, prompts, 24, None, batch_size=4)
    for b, f in zip(batched, free, strict=True):
        assert f.startswith(b) and stop(b) is None


def test_a_row_that_meets_its_stop_leaves_the_batch_and_the_next_prompt_takes_its_place(tiny, monkeypatch):
    from baichuan2.model import generate as gen

    model, tok = tiny
    prompts = [tok.encode(t) for t in ("Hi", "What is two plus two?", "Tell me a story", "Question: why?\nAnswer:",
                                       "Name a colour", "Say yes")]
    free = generate_until(model, tok, prompts, 16, None, batch_size=2)
    # stop strings: the first character of the other completions that prompt 0's completion never writes
    marks = {t[0] for t in free[1:] if t} - set(free[0])
    stopped = [i for i, t in enumerate(free) if i and t and t[0] in marks]
    assert len(stopped) >= 3  # enough rows that stop after their first token to tell the schedules apart
    decoded = []
    real_decode = gen.Batcher._decode
    monkeypatch.setattr(gen.Batcher, "_decode", lambda self: decoded.append(len(self.running)) or real_decode(self))
    out = generate_until(model, tok, prompts, 16, stop_at(sorted(marks)), batch_size=2)
    assert out[0] == free[0] and all(out[i] == "" for i in stopped)
    # a stopped row leaves after a step or two and the next prompt takes its row; static batches would
    # decode it until the longest row of its batch ends (16 steps beside prompt 0)
    assert sum(decoded) <= 16 * (len(prompts) - len(stopped)) + 2 * len(stopped)


@pytest.mark.skipif(GSM8K is None, reason="shared data not present")
def test_gsm8k_end_to_end_resumes(tiny, tmp_path):
    model, tok = tiny
    args = GenArgs(max_new_tokens=8, batch_size=4, limit=4)
    out = tmp_path / "gsm8k"
    res = gsm8k.evaluate_gsm8k(model, tok, GSM8K, args, out, progress=False)
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert res["n"] == 4 == len(items) and res["generated"] == 4
    assert res["accuracy"] == pytest.approx(100 * sum(r["correct"][0] for r in items) / 4)
    assert all(r["pred"] == gsm8k.extract_answer(r["completion"]) for r in items)
    lines = (out / "items.jsonl").read_text().splitlines()
    (out / "items.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:7])
    again = gsm8k.evaluate_gsm8k(model, tok, GSM8K, args, out, progress=False)
    assert again["generated"] == 2 and again["accuracy"] == res["accuracy"]
    redo = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()[2:] if line.endswith("}")]
    assert {r["key"]: r["completion"] for r in redo} == {r["key"]: r["completion"] for r in items[2:]}


# ---- MATH -------------------------------------------------------------------------------------------------
# The cases the published normalisation code documents (Lewkowycz et al. 2022, Listing 1 comments) and the
# kinds of answers it was written for: fractions, \dfrac, spaces, units, \text{}, $...$, thousands separators.
@pytest.mark.parametrize("raw, want", [
    ("\\fracab", "\\frac{a}{b}"),
    ("\\frac{abc}{bef}", "\\frac{abc}{bef}"),
    ("\\fracabc", "\\frac{a}{b}c"),
    ("\\sqrta", "\\sqrt{a}"),
    ("\\sqrtab", "\\sqrt{a}b"),
    ("100,000", "100000"),
    ("\\frac12", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac{3}{4}", "\\frac{3}{4}"),
    ("$x = 5$", "5"),
    ("5 \\text{ inches}", "5"),
    ("10\\text{ cm}^2", "10"),
    ("\\text{(C)}", "(C)"),
    ("\\$18.90", "18.90"),
    ("30^\\circ", "30"),
    ("\\boxed{7}", "7"),
    ("\\textbf{East}", "East"),
    ("3 \\text{ and } x", "3,x"),
    ("3 \\text{ and } 4", "34"),  # a quirk of the published code, kept for comparability
    ("\\$ 1,\\!000", "1000"),
    ("12 \\text{ students}", "12"),
])
def test_minerva_normalisation(raw, want):
    assert minerva_math.normalize_final_answer(raw) == want


def test_math_answer_extraction_and_boxed():
    sol = "So $x = \\boxed{\\frac{1}{2}}$ and not \\boxed{3}? No: \\boxed{\\frac{\\sqrt{2}}{2}}."
    assert minerva_math.last_boxed(sol) == "\\frac{\\sqrt{2}}{2}"
    assert minerva_math.last_boxed("\\boxed 5$.") == "5"
    assert minerva_math.last_boxed("no box") is None
    done = "work...\nFinal Answer: The final answer is $\\dfrac{3}{4}$. I hope it is correct.\n\nProblem:\nx"
    assert minerva_math.normalize_final_answer(minerva_math.extract_answer(done)) == "\\frac{3}{4}"
    assert minerva_math.extract_answer("so it is \\boxed{12}.") == "12"
    prompt = minerva_math.build_prompt("What is $1+1$?")
    assert prompt.count("Problem:\n") == 5 and prompt.endswith("Problem:\nWhat is $1+1$?\n\nSolution:\n")
    assert prompt.count("I hope it is correct.") == 4


def _write_math(root):
    rows = [("Algebra", "Level 1", "What is $2+3$?", "It is $\\boxed{5}$."),
            ("Geometry", "Level 5", "Half of one?", "It is $\\boxed{\\dfrac{1}{2}}$."),
            ("Algebra", "Level 2", "Ten thousand?", "$\\boxed{10,000}$")]
    for i, (typ, level, q, s) in enumerate(rows):
        (root / "test" / typ).mkdir(parents=True, exist_ok=True)
        (root / "test" / typ / f"{i}.json").write_text(json.dumps({"problem": q, "solution": s, "level": level,
                                                                   "type": typ}))


def test_math_end_to_end_per_type_and_level(tiny, tmp_path):
    model, tok = tiny
    _write_math(tmp_path / "MATH")
    problems = minerva_math.load_math(tmp_path / "MATH")
    assert sorted(minerva_math.normalize_final_answer(minerva_math.last_boxed(p["solution"])) for p in problems) \
        == ["10000", "5", "\\frac{1}{2}"]
    res = minerva_math.evaluate_math(model, tok, tmp_path / "MATH", GenArgs(max_new_tokens=8, batch_size=3),
                                     tmp_path / "out", progress=False)
    assert res["n"] == 3 and set(res["by_type"]) == {"Algebra", "Geometry"}
    assert set(res["by_level"]) == {"Level 1", "Level 2", "Level 5"} and res["by_type"]["Algebra"]["n"] == 2
    (tmp_path / "bad.jsonl").write_text('{"problem": "x", "solution": "no box"}\n')
    with pytest.raises(InputError, match="no \\\\boxed"):
        minerva_math.load_math(tmp_path / "bad.jsonl")


# ---- code -------------------------------------------------------------------------------------------------
def test_pass_at_k_matches_the_combinatorial_definition():
    for n, c, k in itertools.product(range(1, 9), range(0, 9), range(1, 9)):
        if c > n or k > n:
            continue
        want = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert code.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_completion_is_cut_at_the_next_top_level_statement():
    body = "    x = 1\n\n    return x\n"
    assert code.truncate_top_level(body + "\ndef other():\n    pass\n") == body
    assert code.truncate_top_level(body + "if __name__ == '__main__':\n    print(1)") == body.rstrip("\n")
    assert code.truncate_top_level(body + "print(f(2))") == body.rstrip("\n")
    assert code.truncate_top_level(body) == body


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    problems = code.load_humaneval()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    sample = problems[::20]
    from baichuan2.eval.sandbox import run_programs

    good = run_programs([code.humaneval_program(p, p["canonical_solution"]) for p in sample], FAST)
    assert all(v.passed for v in good), good
    bad = run_programs([code.humaneval_program(p, "    return None\n") for p in sample], FAST)
    assert not any(v.passed for v in bad) and all(v.reason for v in bad)


@pytest.mark.skipif(MBPP is None, reason="shared data not present")
def test_mbpp_prompt_and_reference_code():
    tasks = code.load_mbpp(MBPP)
    assert len(tasks) == 974 and sum(t in tasks for t in code.MBPP_TEST) == 500
    prompt = code.mbpp_prompt([tasks[t] for t in code.MBPP_SHOTS], tasks[11])
    assert prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3 and prompt.endswith("[BEGIN]\n")
    assert prompt.startswith("You are an expert Python programmer, and here is your task: " + tasks[2]["text"])
    assert "\r" not in prompt
    from baichuan2.eval.sandbox import run_programs

    sample = [tasks[t] for t in range(11, 21)]
    assert all(v.passed for v in run_programs([code.mbpp_program(t, t["code"]) for t in sample], FAST))
    assert not any(v.passed for v in run_programs([code.mbpp_program(t, "pass") for t in sample], FAST))


@pytest.mark.skipif(MBPP is None, reason="shared data not present")
def test_code_benchmarks_end_to_end_with_pass_at_k(tiny, tmp_path):
    model, tok = tiny
    res = code.evaluate_humaneval(model, tok, GenArgs(max_new_tokens=12, batch_size=8, limit=3, n=3), tmp_path / "he",
                                  ks=(1, 2), limits=FAST, progress=False)
    items = [json.loads(line) for line in (tmp_path / "he" / "items.jsonl").read_text().splitlines()]
    assert res["n"] == 3 and all(len(r["completions"]) == 3 == len(r["status"]) for r in items)
    assert res["pass@1"] == pytest.approx(100 * sum(sum(r["passed"]) / 3 for r in items) / 3)
    assert "pass@2" in res and "pass@10" not in res and sum(res["outcomes"].values()) == 9
    assert all(code.truncate_top_level(c) == c for r in items for c in r["completions"])
    res = code.evaluate_mbpp(model, tok, MBPP, GenArgs(max_new_tokens=12, limit=2), tmp_path / "mbpp", limits=FAST,
                             progress=False)
    items = [json.loads(line) for line in (tmp_path / "mbpp" / "items.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in items] == [11, 12] and res["pass@1"] == 0.0  # a random model writes no code
    assert all(r["reasons"][0] for r in items)


@pytest.mark.skipif(GSM8K is None or MBPP is None, reason="shared data not present")
def test_generative_cli(checkpoint, tmp_path, capsys):  # noqa: F811
    from baichuan2.cli import main

    common = ["--out_dir", str(tmp_path), "--settings.limit", "2", "--settings.max_new_tokens", "8"]
    main(["eval", "gsm8k", str(checkpoint), str(GSM8K), *common])
    main(["eval", "humaneval", str(checkpoint), *common, "--timeout", "5"])
    main(["eval", "mbpp", str(checkpoint), str(MBPP), *common, "--timeout", "5"])
    out = capsys.readouterr().out
    assert "gsm8k: " in out and "humaneval: pass@1=" in out and "mbpp: pass@1=" in out
    for name in ("gsm8k", "humaneval", "mbpp"):
        assert json.loads((tmp_path / name / "results.json").read_text())["n"] == 2
