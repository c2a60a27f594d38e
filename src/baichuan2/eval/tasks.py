"""Multiple-choice benchmarks from their published files, and their exact few-shot prompts.

Each loader reads the benchmark's own layout (the user gives the directory; tests use
``../shared/data/bench``) into subjects with a few-shot ``dev`` list and a ``test`` list:

  mmlu     hendrycks/test ``data/{dev,test}/<subject>_{dev,test}.csv`` (no header)
  cmmlu    haonan-li/CMMLU ``data/{dev,test}/<subject>.csv`` (header ``,Question,A,B,C,D,Answer``)
  ceval    ceval-exam ``{dev,val,test}/<subject>_{split}.csv`` (+ ``subject_mapping.json``)
  gaokao   GAOKAO-Bench ``Data/Objective_Questions/*.json``: single-answer questions with A-D parsed
           out of the question text; a seeded random dev/test split per subject (as Baichuan 2 did)
  agieval  AGIEval ``data/v1/*.jsonl``: single-label multiple-choice sets; seeded dev/test split

Prompts (templates copied character for character from the reference scripts, see
``../shared/reference/anchors-align-eval.md``): MMLU as hendrycks/Baichuan-7B (note the double space
after "about"), CMMLU as its official script, C-Eval as Baichuan-7B's ``evaluate_zh.py`` (shots
separated by one newline), Gaokao and AGIEval in the C-Eval style, as Baichuan 2 describes.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from baichuan2.utils.io import InputError

ASSETS = Path(__file__).parent / "assets"
LETTERS = "ABCDEFGH"


@dataclass
class Item:
    question: str
    choices: list[str]  # option texts, in letter order
    answer: str  # the correct letter
    index: int = 0  # position in the subject's test list (the cache key)


@dataclass
class Subject:
    name: str
    display: str  # the name as the prompt shows it
    category: str
    dev: list[Item] = field(default_factory=list)
    test: list[Item] = field(default_factory=list)


@dataclass
class Benchmark:
    name: str
    subjects: dict[str, Subject]

    def prompt(self, subject: Subject, shots: list[Item], item: Item) -> str:
        return PROMPTS[self.name](subject, shots, item)

    @property
    def num_items(self) -> int:
        return sum(len(s.test) for s in self.subjects.values())


def _options(item: Item) -> str:
    return "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))


def mmlu_prompt(subject: Subject, shots: list[Item], item: Item) -> str:
    out = f"The following are multiple choice questions (with answers) about {subject.display}.\n\n"
    for s in shots:
        out += f"{s.question}{_options(s)}\nAnswer: {s.answer}\n\n"
    return out + f"{item.question}{_options(item)}\nAnswer:"


def cmmlu_prompt(subject: Subject, shots: list[Item], item: Item) -> str:
    out = f"以下是关于{subject.display}的单项选择题，请直接给出正确答案的选项。\n\n"
    for s in shots:
        out += f"题目：{s.question}{_options(s)}\n答案是：{s.answer}\n\n"
    return out + f"题目：{item.question}{_options(item)}\n答案是："


def ceval_prompt(subject: Subject, shots: list[Item], item: Item) -> str:
    out = f"以下是中国关于{subject.display}考试的单项选择题，请选出其中的正确答案。\n"
    for s in shots:
        out += f"\n{s.question}{_options(s)}\n答案：{s.answer}"
    return out + f"\n{item.question}{_options(item)}\n答案："


# What separates the prompt's "Answer:" from the letter in the shots (and so in the scored continuation).
ANSWER_SEPARATOR = {"mmlu": " "}

PROMPTS = {"mmlu": mmlu_prompt, "cmmlu": cmmlu_prompt, "ceval": ceval_prompt, "gaokao": ceval_prompt,
           "agieval": ceval_prompt}


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"{path}: not found ({what})")
    return path


def _read_csv(path: Path, header: bool) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 ({e})") from None
    return rows[1:] if header else rows


def _mc_rows(path: Path, rows: list[list[str]], q: int, first_choice: int, answer: int, n: int = 4) -> list[Item]:
    items = []
    for line, r in enumerate(rows, 1):
        if len(r) <= max(q, answer, first_choice + n - 1):
            raise InputError(f"{path}:{line}: expected question, {n} options and an answer, got {len(r)} fields")
        ans = r[answer].strip()
        if ans not in LETTERS[:n]:
            raise InputError(f"{path}:{line}: answer {ans!r} is not one of {LETTERS[:n]}")
        items.append(Item(r[q], [r[first_choice + i] for i in range(n)], ans, len(items)))
    return items


def load_mmlu(root: str | Path) -> Benchmark:
    root = Path(root)
    data = root / "data" if (root / "data").exists() else root
    cats = json.loads((ASSETS / "mmlu_categories.json").read_text())
    subjects = {}
    for dev in sorted(_require(data / "dev", "MMLU dev split").glob("*_dev.csv")):
        name = dev.name[: -len("_dev.csv")]
        test = _require(data / "test" / f"{name}_test.csv", "MMLU test split")
        display = " " + name.replace("_", " ")  # hendrycks' format_subject keeps a leading space
        subjects[name] = Subject(name, display, cats.get(name, "Other"),
                                 _mc_rows(dev, _read_csv(dev, False), 0, 1, 5),
                                 _mc_rows(test, _read_csv(test, False), 0, 1, 5))
    return _nonempty(Benchmark("mmlu", subjects), root)


def load_cmmlu(root: str | Path) -> Benchmark:
    root = Path(root)
    data = root / "data" if (root / "data").exists() else root
    meta = json.loads((ASSETS / "cmmlu_subjects.json").read_text(encoding="utf-8"))
    subjects = {}
    for test in sorted(_require(data / "test", "CMMLU test split").glob("*.csv")):
        name = test.stem
        dev = _require(data / "dev" / test.name, "CMMLU dev split")
        info = meta.get(name, {"name": name.replace("_", " "), "category": "Other"})
        subjects[name] = Subject(name, info["name"], info["category"], _mc_rows(dev, _read_csv(dev, True), 1, 2, 6),
                                 _mc_rows(test, _read_csv(test, True), 1, 2, 6))
    return _nonempty(Benchmark("cmmlu", subjects), root)


def load_ceval(root: str | Path, split: str = "val", mapping: str | Path | None = None) -> Benchmark:
    """C-Eval from the ceval-exam layout; ``split`` "val" has answers (the test answers are not public)."""
    root = Path(root)
    mapping = Path(mapping) if mapping else root / "subject_mapping.json"
    names = json.loads(mapping.read_text(encoding="utf-8")) if mapping.exists() else {}
    subjects = {}
    for path in sorted(_require(root / split, f"C-Eval {split} split").glob(f"*_{split}.csv")):
        name = path.name[: -len(f"_{split}.csv")]
        dev = _require(root / "dev" / f"{name}_dev.csv", "C-Eval dev split")
        header = _read_csv(dev, False)[0]
        col = {h: i for i, h in enumerate(header)}
        if not {"question", "A", "B", "C", "D", "answer"} <= set(col):
            raise InputError(f"{dev}: expected columns id,question,A,B,C,D,answer, got {header}")
        en, zh, cat = names.get(name, [name, name.replace("_", " "), "Other"])
        shots = _mc_rows(dev, _read_csv(dev, True), col["question"], col["A"], col["answer"])
        random.Random(123).shuffle(shots)  # Baichuan-7B: dev.shuffle(seed=123)[:k]
        subjects[name] = Subject(name, zh, cat, shots,
                                 _mc_rows(path, _read_csv(path, True), col["question"], col["A"], col["answer"]))
    return _nonempty(Benchmark("ceval", subjects), root)


GAOKAO_SUBJECTS = {"Biology": "生物", "Chemistry": "化学", "Chinese_Lang_and_Usage": "语文", "Chinese_Modern_Lit": "语文",
                   "English": "英语", "Geography": "地理", "History": "历史", "Math_I": "数学", "Math_II": "数学",
                   "Physics": "物理", "Political_Science": "政治"}
_OPTION = re.compile(r"(?<![A-Za-z])([A-D])\s*[．.、:：]")


def split_options(text: str) -> tuple[str, list[str]] | None:
    """``"stem A．x B．y C．z D．w"`` -> (stem, [x, y, z, w]); None unless A-D appear once each, in order."""
    marks = [(m.group(1), m.start(), m.end()) for m in _OPTION.finditer(text)]
    if [m[0] for m in marks] != list("ABCD"):
        return None
    stem = text[: marks[0][1]].strip()
    opts = [text[marks[i][2]: marks[i + 1][1] if i < 3 else len(text)].strip() for i in range(4)]
    return (stem, opts) if stem and all(opts) else None


def _split_dev(items: list[Item], seed: int, shots: int) -> tuple[list[Item], list[Item]]:
    order = list(items)
    random.Random(seed).shuffle(order)
    dev, test = order[:shots], order[shots:]
    for i, it in enumerate(test):
        it.index = i
    return dev, test


def load_gaokao(root: str | Path, seed: int = 0, shots: int = 5) -> Benchmark:
    root = Path(root)
    data = root / "Data" / "Objective_Questions" if (root / "Data").exists() else root
    subjects = {}
    for path in sorted(_require(data, "GAOKAO-Bench objective questions").glob("*.json")):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not a GAOKAO-Bench JSON file ({e})") from None
        key = re.sub(r"^\d{4}-\d{4}_|_MCQs$", "", path.stem)
        items = []
        for ex in raw.get("example", []):
            answer = ex.get("answer")
            if isinstance(answer, str):
                answer = re.findall(r"[A-Z]", answer)
            if not isinstance(answer, list) or len(answer) != 1 or answer[0] not in "ABCD":
                continue  # keep single-answer, four-option questions only
            parsed = split_options(ex.get("question", ""))
            if parsed:
                items.append(Item(parsed[0], parsed[1], answer[0]))
        if len(items) > shots:
            dev, test = _split_dev(items, seed, shots)
            subjects[key] = Subject(key, GAOKAO_SUBJECTS.get(key, key.replace("_", " ")), "Gaokao", dev, test)
    return _nonempty(Benchmark("gaokao", subjects), root)


AGIEVAL_NAMES = {"gaokao-biology": "高考生物", "gaokao-chemistry": "高考化学", "gaokao-chinese": "高考语文",
                 "gaokao-english": "高考英语", "gaokao-geography": "高考地理", "gaokao-history": "高考历史",
                 "gaokao-mathqa": "高考数学", "gaokao-physics": "高考物理", "logiqa-zh": "逻辑推理",
                 "jec-qa-kd": "司法考试", "jec-qa-ca": "司法考试"}


def load_agieval(root: str | Path, seed: int = 0, shots: int = 5) -> Benchmark:
    root = Path(root)
    data = root / "data" / "v1" if (root / "data" / "v1").exists() else root
    subjects = {}
    for path in sorted(_require(data, "AGIEval data/v1").glob("*.jsonl")):
        items = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{line_no}: malformed JSON ({e})") from None
            options, label = ex.get("options") or [], ex.get("label")
            if not options or not isinstance(label, str) or len(label) != 1 or len(options) > len(LETTERS):
                continue  # cloze / multi-answer sets are not single-choice
            choices = [re.sub(r"^\s*\(?[A-H]\)\s*", "", o).strip() for o in options]
            if label not in LETTERS[: len(choices)] or not all(choices):
                continue  # a few items have an empty option in the published file
            question = ((ex.get("passage") or "") + "\n" + (ex.get("question") or "")).strip()
            items.append(Item(question, choices, label))
        if len(items) > shots:
            dev, test = _split_dev(items, seed, shots)
            zh = path.stem in AGIEVAL_NAMES
            subjects[path.stem] = Subject(path.stem, AGIEVAL_NAMES.get(path.stem, path.stem),
                                          "Chinese" if zh else "English", dev, test)
    return _nonempty(Benchmark("agieval", subjects), root)


def _nonempty(b: Benchmark, root: Path) -> Benchmark:
    if not b.subjects:
        raise InputError(f"{root}: no {b.name} subjects found (see `baichuan2 eval mc --help` for the layout)")
    return b


LOADERS = {"mmlu": load_mmlu, "cmmlu": load_cmmlu, "ceval": load_ceval, "gaokao": load_gaokao, "agieval": load_agieval}


@cache
def load_benchmark(name: str, root: str) -> Benchmark:
    if name not in LOADERS:
        raise InputError(f"unknown benchmark {name!r}; choose from {', '.join(LOADERS)}")
    return LOADERS[name](root)
