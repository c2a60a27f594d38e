"""GGUF export: read the file back with the `gguf` package, dequantise, run it through our model."""

from __future__ import annotations

import shutil

import pytest
import torch

from baichuan2.cli import main
from baichuan2.export.gguf import (CHAT_TEMPLATE, bpe_pre_tokenizer, export_gguf, permute_for_ggml, read_gguf,
                                   state_from_gguf, unpermute_from_ggml)
from baichuan2.model import Baichuan, ModelConfig
from baichuan2.model.checkpoint import load_pretrained, save_pretrained
from baichuan2.tokenizer import Tokenizer
from baichuan2.utils.io import InputError
from tests.conftest import shared_path


VOCAB = 600


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    """A small SentencePiece BPE made like Baichuan 2's (byte fallback, the two chat role pieces at
    ids 195/196 as <reserved_106>/<reserved_107>), so the export's 125k-piece loop stays out of the tests."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("tok")
    text = shared_path("baichuan2-tokenizer", "tokenizer_config.json").read_text(encoding="utf-8")
    text += "\n".join(f"sentence {i} about Baichuan 2, 百川 {i * 7}" for i in range(300))
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    # user-defined pieces follow <unk> <s> </s>: 192 fillers put the role pieces at ids 195/196
    reserved = [f"<extra_{i}>" for i in range(192)] + ["<reserved_106>", "<reserved_107>"]
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "tokenizer"),
                                   vocab_size=VOCAB, model_type="bpe", byte_fallback=True,
                                   user_defined_symbols=reserved, hard_vocab_limit=False,
                                   minloglevel=2)
    return root / "tokenizer.model"


def _checkpoint(path, tokenizer_model, **overrides) -> Baichuan:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-rope", vocab_size=VOCAB, intermediate_size=192, **overrides)
    model = Baichuan(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # an un-normalised head: the export must normalise it
    save_pretrained(model, path, copy_files=[tokenizer_model])
    return model


def _logits_from_gguf(path, cfg: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    meta, tensors = read_gguf(path)
    state = state_from_gguf(tensors, cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers,
                            cfg.position_embedding == "rope")
    model = Baichuan(cfg).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(ids).logits


def test_qk_permutation_round_trips():
    w = torch.randn(64, 32)
    assert torch.equal(unpermute_from_ggml(permute_for_ggml(w, 4), 4), w)
    assert not torch.equal(permute_for_ggml(w, 4), w)


@pytest.mark.parametrize("outtype,tol", [("q8_0", 0.03), ("q4_0", 0.3)])
def test_rope_model_exports_as_llama_with_the_same_logits(tmp_path, tokenizer_model, outtype, tol):
    model = _checkpoint(tmp_path / "m", tokenizer_model)
    main(["export", "gguf", str(tmp_path / "m"), str(tmp_path / "m.gguf"), "--outtype", outtype])
    meta, tensors = read_gguf(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and meta["llama.rope.dimension_count"] == 16
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert meta["baichuan2.chat.user_token_id"] == 195 and meta["baichuan2.chat.assistant_token_id"] == 196
    assert "blk.0.attn_q.weight" in tensors and "output.weight" in tensors
    # the head went out pre-normalised
    assert torch.allclose(torch.from_numpy(tensors["output.weight"]).norm(dim=-1), torch.ones(VOCAB), atol=0.02)
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    out = _logits_from_gguf(tmp_path / "m.gguf", model.config, ids)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert 0 < rel < tol, f"{outtype}: logits off by {rel:.4f} of their range"


def test_tokenizer_metadata_is_the_sentencepiece_vocabulary(tmp_path, tokenizer_model):
    import gguf
    import sentencepiece as spm

    _checkpoint(tmp_path / "m", tokenizer_model, num_hidden_layers=1)
    main(["export", "gguf", str(tmp_path / "m"), str(tmp_path / "m.gguf")])
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    assert len(tokens) == sp.vocab_size() == VOCAB
    for i in (0, 1, 2, 195, 196, 300, VOCAB - 1):
        assert tokens[i] == sp.id_to_piece(i) and scores[i] == pytest.approx(sp.get_score(i))
    byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in (0, 0x41, 0xFF)]
    assert all(types[i] == gguf.TokenType.BYTE for i in byte_ids)
    assert types[1] == gguf.TokenType.CONTROL and types[0] == gguf.TokenType.UNKNOWN
    assert types[195] == types[196] == gguf.TokenType.USER_DEFINED  # role pieces: matched whole, as sentencepiece does
    assert types[VOCAB - 1] == gguf.TokenType.NORMAL
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False


def test_alibi_40_layers_exports_as_baichuan_and_other_depths_are_refused(tmp_path, tokenizer_model):
    model = _checkpoint(tmp_path / "a40", tokenizer_model, position_embedding="alibi", num_hidden_layers=40)
    main(["export", "gguf", str(tmp_path / "a40"), str(tmp_path / "a40.gguf"), "--outtype", "f16"])
    meta, _ = read_gguf(tmp_path / "a40.gguf")
    assert meta["general.architecture"] == "baichuan" and meta["baichuan.attention.max_alibi_bias"] == 8.0
    ids = torch.randint(3, VOCAB, (1, 10))
    with torch.no_grad():
        ref = model(ids).logits
    out = _logits_from_gguf(tmp_path / "a40.gguf", model.config, ids)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 5e-3

    _checkpoint(tmp_path / "a2", tokenizer_model, position_embedding="alibi")
    with pytest.raises(SystemExit, match="only with 40 layers"):
        main(["export", "gguf", str(tmp_path / "a2"), str(tmp_path / "a2.gguf")])
    assert not (tmp_path / "a2.gguf").exists()


def test_bad_inputs_give_one_clear_line(tmp_path, tokenizer_model):
    _checkpoint(tmp_path / "m", tokenizer_model, num_hidden_layers=1)
    with pytest.raises(InputError, match="outtype must be"):
        export_gguf(str(tmp_path / "m"), str(tmp_path / "x.gguf"), "q5_k")
    (tmp_path / "x.gguf").write_bytes(b"old")
    with pytest.raises(SystemExit, match="exists"):
        main(["export", "gguf", str(tmp_path / "m"), str(tmp_path / "x.gguf")])
    shutil.copytree(tmp_path / "m", tmp_path / "notok")
    (tmp_path / "notok" / "tokenizer.model").unlink()
    with pytest.raises(SystemExit, match="no tokenizer.model"):
        main(["export", "gguf", str(tmp_path / "notok"), str(tmp_path / "y.gguf")])
    with pytest.raises(SystemExit, match="no config.json"):
        main(["export", "gguf", str(tmp_path / "nothing"), str(tmp_path / "y.gguf")])


# ---- Llama-family checkpoints (byte-level BPE tokenizer.json, plain head) ---------------------------------

@pytest.fixture(scope="module")
def converted_llama(tmp_path_factory):
    """A tiny SmolLM2-shaped Llama (GQA, tied embeddings, byte-level BPE, ChatML) converted to our layout."""
    from tests.tiny_llama import build_tiny_llama

    root = tmp_path_factory.mktemp("llama")
    main(["convert", "from-llama", str(build_tiny_llama(root / "llama")), str(root / "bc")])
    return root / "bc"


BPE_TEXTS = ["Hello, how are you today?", "def add(a, b):\n    return a + b", "café 北京 百川 🙂",
             "Numbers 12345 and  two  spaces", "<|im_start|>user\nhi<|im_end|>\n"]


def test_bpe_checkpoint_exports_the_gpt2_vocabulary_merges_and_template(tmp_path, converted_llama):
    import json

    import gguf

    from tests.tiny_llama import CHATML

    main(["export", "gguf", str(converted_llama), str(tmp_path / "m.gguf")])
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    field = lambda name: reader.fields[name].contents()  # noqa: E731
    source = json.loads((converted_llama / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {i: tok for tok, i in source["model"]["vocab"].items()}
    vocab.update({t["id"]: t["content"] for t in source["added_tokens"]})
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.tokens") == [vocab[i] for i in range(len(vocab))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in source["model"]["merges"]]
    assert field("tokenizer.ggml.merges") == merges and len(merges) > 100
    types = field("tokenizer.ggml.token_type")
    assert [types[i] for i in (0, 1, 2)] == [gguf.TokenType.CONTROL] * 3  # <|endoftext|> <|im_start|> <|im_end|>
    assert types[200] == gguf.TokenType.NORMAL
    assert field("tokenizer.chat_template") == CHATML
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field("tokenizer.ggml.add_bos_token") is False
    meta, tensors = read_gguf(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "llama"
    # a converted model's head is plain (norm_head false): it goes out un-normalised
    head = load_pretrained(converted_llama, dtype="float32").lm_head.weight
    assert torch.allclose(torch.from_numpy(tensors["output.weight"]), head, atol=2e-2)
    assert head.norm(dim=-1).std() > 0.5  # rows of very different norms (a normalised head has none)


def test_bpe_export_round_trips_through_transformers_and_convert_from_gguf(tmp_path, converted_llama):
    """transformers reads our llama GGUF (un-permuting q/k, rebuilding the tokenizer from the metadata):
    the tokens of English / Chinese / emoji / special-token text and the logits equal the source's."""
    main(["export", "gguf", str(converted_llama), str(tmp_path / "m.gguf"), "--outtype", "f16"])
    main(["convert", "from-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "back")])
    source_tok, back_tok = Tokenizer.from_pretrained(converted_llama), Tokenizer.from_pretrained(tmp_path / "back")
    for text in BPE_TEXTS:
        assert back_tok.encode(text) == source_tok.encode(text), text
    assert (back_tok.bos_id, back_tok.eos_id) == (source_tok.bos_id, source_tok.eos_id)
    source, back = load_pretrained(converted_llama, dtype="float32"), load_pretrained(tmp_path / "back", dtype="float32")
    ids = torch.tensor([source_tok.encode(" ".join(BPE_TEXTS))])
    with torch.no_grad():
        ref, out = source(ids).logits, back(ids).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 5e-3
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_bpe_pre_tokenizer_names_and_refusals():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert bpe_pre_tokenizer({"pre_tokenizer": byte_level}, "t") == "gpt-2"
    assert bpe_pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, byte_level]}},
                             "t") == "smollm"
    with pytest.raises(InputError, match="no llama.cpp equivalent"):
        bpe_pre_tokenizer({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"}}, "t")
    with pytest.raises(InputError, match="normalizer"):
        bpe_pre_tokenizer({"pre_tokenizer": byte_level, "normalizer": {"type": "NFKC"}}, "t")
