"""Run our checkpoints under EleutherAI's lm-evaluation-harness as the registered model type ``baichuan2``.

    lm_eval --model baichuan2 --model_args pretrained=runs/x/release/final,batch_size=8 --tasks ...

or in Python: ``lm_eval.simple_evaluate(model=Baichuan2LM("ckpt"), tasks=[...])``. Log-likelihoods come
from the same batched scorer as ``baichuan2 eval`` (so results agree), generation from our KV-cache
sampler with lm-eval's ``until`` stop strings, batched. BOS follows the checkpoint's tokenizer config
(``add_bos_token``; false for Baichuan 2) unless ``add_bos_token=true|false`` is given, as in lm-eval's
``hf`` model.

``write_mmlu_tasks`` turns our MMLU rows into local lm-eval task files with our exact prompt, so any lm-eval
model (``hf`` included) can be checked against ``baichuan2 eval mc`` item by item
(``benchmarks/eval_agreement.py``, ``tests/eval/test_agreement.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from baichuan2.eval.scoring import continuation_logprobs, token_nll


@register_model("baichuan2")
class Baichuan2LM(TemplateLM):
    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, batch_size: int | str = 8,
                 max_gen_toks: int = 256, dtype: str = "auto", device: str = "auto",
                 add_bos_token: bool | str | None = None, **_):
        super().__init__()
        if model is None:
            from baichuan2.model.checkpoint import load_pretrained
            from baichuan2.tokenizer import Tokenizer

            if not pretrained:
                raise ValueError("baichuan2 model needs pretrained=<checkpoint directory>")
            model = load_pretrained(pretrained, dtype=dtype, device=device)
            tokenizer = Tokenizer.from_pretrained(pretrained)
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = model.config.max_position_embeddings
        from baichuan2.eval.harness import bos_prefix

        self.prefix = bos_prefix(self.tok, "auto" if add_bos_token is None else add_bos_token)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.prefix[0] if self.prefix else self.tok.eos_id  # lm-eval's rule: BOS if used, else EOT

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return (self.prefix if add_special_tokens is not False else []) + self.tok.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return continuation_logprobs(self.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            ids = [self.prefix_token_id] + self.tok.encode(req.args[0])
            w = self.max_length
            # windows overlapping by one token: each token after bos is predicted exactly once
            rows = [ids[i: i + w] for i in range(0, len(ids) - 1, w - 1)]
            out.append(-sum(token_nll(self.model, rows, self.batch_size)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from baichuan2.eval.generation import generate_until, stop_at

        groups: dict[tuple, list[int]] = {}  # requests with the same settings are generated together
        for i, req in enumerate(requests):
            kwargs = req.args[1]
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", True) else 0.0
            max_new = min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
            groups.setdefault((until, max_new, temperature), []).append(i)
        results = [""] * len(requests)
        for (until, max_new, temperature), idx in groups.items():
            prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in idx]
            texts = generate_until(self.model, self.tok, prompts, max_new, stop_at(until), self.batch_size,
                                   temperature)
            for i, text in zip(idx, texts, strict=True):
                results[i] = text
        return results


def write_mmlu_tasks(bench, directory: str | Path, shots: int = 5) -> list[str]:
    """One lm-eval ``multiple_choice`` task per subject of an MMLU ``Benchmark``, written to ``directory`` as
    ``mmlu_local_<subject>.yaml`` with its test rows and first ``shots`` dev rows as JSONL. The prompt is ours
    (``tasks.mmlu_prompt``): the description line, then lm-eval joins ``Question\\nA. ..\\nAnswer:`` + " " +
    letter shots with blank lines, the choices are the letters after the target delimiter " ". Returns the task
    names (load them with ``TaskManager(include_path=directory)``)."""
    import yaml

    if bench.name != "mmlu":
        raise ValueError(f"write_mmlu_tasks writes MMLU's template, not {bench.name}'s")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    def rows(items) -> str:
        return "".join(json.dumps({"question": it.question, **dict(zip("ABCD", it.choices, strict=True)),
                                   "answer": it.answer}) + "\n" for it in items)

    tasks = []
    for name, s in bench.subjects.items():
        (out / f"{name}_test.jsonl").write_text(rows(s.test), encoding="utf-8")
        (out / f"{name}_dev.jsonl").write_text(rows(s.dev[:shots]), encoding="utf-8")
        task = f"mmlu_local_{name}"
        cfg = {"task": task, "dataset_path": "json",
               "dataset_kwargs": {"data_files": {"test": str(out / f"{name}_test.jsonl"),
                                                 "dev": str(out / f"{name}_dev.jsonl")}},
               "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
               "output_type": "multiple_choice",
               "description": f"The following are multiple choice questions (with answers) about {s.display}.\n\n",
               "doc_to_text": "{{question}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:",
               "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "{{answer}}", "target_delimiter": " ",
               "fewshot_delimiter": "\n\n", "metric_list": [{"metric": "acc", "aggregation": "mean",
                                                              "higher_is_better": True}]}
        (out / f"{task}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
        tasks.append(task)
    return tasks


def mc_samples(results: dict, tasks: list[str]) -> dict[tuple[str, int], tuple[str, list[float]]]:
    """``{(subject, doc_id): (context string, per-choice log-likelihoods)}`` from ``simple_evaluate(...,
    log_samples=True)`` results of ``write_mmlu_tasks`` tasks."""
    out = {}
    for task in tasks:
        for sample in results["samples"][task]:
            out[(task[len("mmlu_local_"):], int(sample["doc_id"]))] = (
                sample["arguments"][0][0], [float(r[0]) for r in sample["filtered_resps"]])
    return out
