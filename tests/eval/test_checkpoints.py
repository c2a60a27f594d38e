"""`eval checkpoints`: every release of a run, in token order, on held-out perplexity and the MC benchmarks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from baichuan2.eval.checkpoints import evaluate_checkpoints, find_releases
from baichuan2.eval.harness import MCArgs
from baichuan2.utils.io import InputError
from tests.eval.test_eval import _write_cmmlu
from tests.serve.conftest import checkpoint  # noqa: F401  (the tiny model + tokenizer fixture)


def _fake_run(checkpoint, root):  # noqa: F811
    """release/tokens-N like pretraining writes them (weights perturbed so the releases differ)."""
    from baichuan2.model.checkpoint import load_pretrained, save_pretrained
    from baichuan2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(checkpoint)
    for i, tokens in enumerate((3000, 1000, 2000)):
        d = root / "release" / f"tokens-{tokens:015d}"
        model = load_pretrained(checkpoint)
        torch.manual_seed(i)
        with torch.no_grad():
            for w in model.parameters():
                w.add_(0.05 * i * torch.randn_like(w))
        save_pretrained(model, d, tokenizer=tok, extra_files={"release.json": {"tokens": tokens, "step": i}})
    (root / "release" / "not-a-checkpoint").mkdir()


def test_checkpoints_table_and_plot(checkpoint, tmp_path, capsys):  # noqa: F811
    _fake_run(checkpoint, tmp_path / "run")
    releases = find_releases(tmp_path / "run")
    assert [r["tokens"] for r in releases] == [1000, 2000, 3000]
    _write_cmmlu(tmp_path / "bench" / "cmmlu", n_test=2)
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": f"Hello there, number {i}."}) + "\n"
                                                for i in range(5)))
    out = tmp_path / "out"
    table = evaluate_checkpoints(tmp_path / "run", out, tmp_path / "bench", heldout=str(tmp_path / "val.jsonl"),
                                 mc=MCArgs(shots=1, batch_size=4), progress=False)
    assert table["benchmarks"] == ["cmmlu"] and table["chance"]["cmmlu"] == pytest.approx(25.0)
    rows = table["releases"]
    assert [r["tokens"] for r in rows] == [1000, 2000, 3000] and all(r["cmmlu"]["n"] == 4 for r in rows)
    assert len({round(r["heldout"]["bits_per_byte"], 6) for r in rows}) == 3  # the releases really differ
    md = (out / "checkpoints.md").read_text()
    assert "| tokens-000000000001000 | 1,000 |" in md and "chance" in md
    assert (out / "checkpoints.png").stat().st_size > 10_000
    # a list of HF directories works too, kept in the given order when they carry no release.json
    plain = tmp_path / "plain"
    shutil.copytree(checkpoint, plain)
    assert [r["name"] for r in find_releases([str(plain), str(rows[0]["path"])])] == ["plain", "tokens-000000000001000"]
    with pytest.raises(InputError, match="nothing to evaluate"):
        evaluate_checkpoints(str(plain), out, tmp_path / "nothing-here")
    from baichuan2.cli import main

    main(["eval", "checkpoints", f"{plain},{rows[0]['path']}", "--out_dir", str(tmp_path / "cli"),
          "--heldout", str(tmp_path / "val.jsonl")])
    assert "| plain | - |" in capsys.readouterr().out
