"""Every verb that loads a model takes ``--quantize int8|int4`` and loads a checkpoint written by
``baichuan2 quantize`` as it is: generate, chat, serve and each eval benchmark."""

from __future__ import annotations

import builtins
import inspect

import pytest
import torch

from baichuan2.cli import main
from baichuan2.model import Baichuan, ModelConfig
from baichuan2.model import checkpoint as checkpoint_module
from baichuan2.model.checkpoint import save_pretrained

VOCAB = 400


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny full-precision checkpoint with a SentencePiece tokenizer, and its int8 copy made by the verb."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("quant_verbs")
    (root / "corpus.txt").write_text("\n".join(f"line {i}: quantized weights decode faster, {i * 3} times"
                                               for i in range(300)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "tokenizer"),
                                   vocab_size=VOCAB, model_type="bpe", byte_fallback=True, hard_vocab_limit=False,
                                   minloglevel=2)
    torch.manual_seed(0)
    model = Baichuan(ModelConfig.from_name("tiny-rope", vocab_size=VOCAB, intermediate_size=192))
    save_pretrained(model, root / "fp", copy_files=[root / "tokenizer.model"])
    main(["quantize", str(root / "fp"), str(root / "int8"), "--method", "int8"])
    return root


@pytest.fixture
def loaded(monkeypatch):
    """The models the verbs load (load_pretrained is imported inside each verb, so patching the module works)."""
    models = []
    real = checkpoint_module.load_pretrained

    def spy(*args, **kwargs):
        models.append(real(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(checkpoint_module, "load_pretrained", spy)
    return models


def _run_verb(verb: str, ckpt: str, extra: list[str], root, monkeypatch) -> None:
    if verb == "generate":
        main(["generate", ckpt, "line", "--max_new_tokens", "2", "--greedy", "true", *extra])
    elif verb == "chat":
        def no_more_input(prompt=""):
            raise EOFError

        monkeypatch.setattr(builtins, "input", no_more_input)
        main(["chat", ckpt, *extra])
    elif verb == "serve":
        import uvicorn

        monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)  # loading is what is tested, not serving
        threads = torch.get_num_threads()
        try:
            main(["serve", ckpt, "--port", "0", *extra])
        finally:
            torch.set_num_threads(threads)
    else:  # eval ppl: a real forward pass over text
        (root / "text.txt").write_text("line 7: quantized weights decode faster, 21 times\n" * 4, encoding="utf-8")
        main(["eval", "ppl", ckpt, str(root / "text.txt"), "--window", "16"])
        if extra:
            main(["eval", "ppl", ckpt, str(root / "text.txt"), "--window", "16", *extra])


@pytest.mark.parametrize("verb", ["generate", "chat", "serve", "eval"])
def test_verb_quantizes_on_load_and_loads_quantized_checkpoints(verb, checkpoints, loaded, monkeypatch, capsys):
    _run_verb(verb, str(checkpoints / "fp"), ["--quantize", "int4"], checkpoints, monkeypatch)
    assert [getattr(m, "quantization", None) and m.quantization.method for m in loaded][-1] == "int4"
    loaded.clear()
    _run_verb(verb, str(checkpoints / "int8"), [], checkpoints, monkeypatch)
    assert loaded and loaded[-1].quantization.method == "int8"
    assert "model.layers.0.mlp.down_proj.qweight" in loaded[-1].state_dict()


def test_every_eval_benchmark_takes_quantize():
    from baichuan2.eval.cli import COMMANDS

    loading = [name for name, fn in COMMANDS.items() if "_load(" in inspect.getsource(fn)]
    assert {"mc", "bbh", "gsm8k", "math", "humaneval", "mbpp", "ppl", "safety"} <= set(loading)
    for name in loading:
        params = inspect.signature(COMMANDS[name]).parameters
        assert "quantize" in params and params["quantize"].default is None, name
        assert "_load(checkpoint, dtype, device, quantize)" in inspect.getsource(COMMANDS[name]), name


def test_bad_quantize_value_is_one_clear_line(checkpoints):
    with pytest.raises(SystemExit, match="method must be 'int8' or 'int4'"):
        main(["eval", "ppl", str(checkpoints / "fp"), str(checkpoints / "corpus.txt"), "--quantize", "int3"])
