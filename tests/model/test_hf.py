"""transformers integration: Llama parity through `convert`, Auto classes, generate()."""

from __future__ import annotations

import json

import pytest
import torch

import baichuan2  # noqa: F401  (registers model_type "baichuan" with the Auto classes)
from baichuan2.cli import main as cli
from baichuan2.model import Baichuan, ModelConfig, save_pretrained
from baichuan2.model.checkpoint import CheckpointError, load_pretrained
from baichuan2.model.convert import from_llama, to_llama
from baichuan2.model.generate import SamplingConfig, generate

transformers = pytest.importorskip("transformers")


def tiny(pos="rope", **kw) -> Baichuan:
    torch.manual_seed(2)
    model = Baichuan(ModelConfig.from_name(f"tiny-{pos}", **kw)).eval()
    with torch.no_grad():  # un-normalised head rows, like the released checkpoints
        model.lm_head.weight.mul_(torch.rand(model.config.vocab_size, 1) * 5 + 0.5)
    return model


@torch.no_grad()
def test_logits_match_transformers_llama_after_conversion(tmp_path):
    model = tiny("rope", rope_theta=10000.0)
    save_pretrained(model, tmp_path / "bc")
    cli(["convert", "to-llama", str(tmp_path / "bc"), str(tmp_path / "llama")])
    llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    assert "W_pack" not in str(llama.state_dict().keys())
    ids = torch.randint(3, 512, (2, 33))
    ours, theirs = model(ids).logits, llama(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    # padded batch through both
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    a = model(ids, attention_mask=mask).logits[0, 5:]
    b = llama(ids[:1, 5:]).logits[0]
    assert (a - b).abs().max().item() < 1e-4


@torch.no_grad()
def test_llama_round_trip_back_to_baichuan(tmp_path):
    model = tiny("rope")
    save_pretrained(model, tmp_path / "bc")
    to_llama(str(tmp_path / "bc"), str(tmp_path / "llama"))
    from_llama(str(tmp_path / "llama"), str(tmp_path / "back"))
    back = load_pretrained(tmp_path / "back").eval()
    ids = torch.randint(3, 512, (1, 17))
    assert (back(ids).logits - model(ids).logits).abs().max().item() < 1e-5


def test_alibi_models_refuse_llama_conversion(tmp_path):
    save_pretrained(tiny("alibi"), tmp_path / "bc")
    with pytest.raises(CheckpointError, match="ALiBi"):
        to_llama(str(tmp_path / "bc"), str(tmp_path / "llama"))


@pytest.mark.parametrize("pos", ["rope", "alibi"])
@torch.no_grad()
def test_auto_classes_load_and_generate(tmp_path, pos):
    model = tiny(pos)
    save_pretrained(model, tmp_path / "ck")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "ck")
    assert type(config).__name__ == "BaichuanConfig" and config.position_embedding == pos
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
    assert type(hf).__name__ == "BaichuanForCausalLM"
    ids = torch.randint(3, 512, (2, 11))
    assert torch.allclose(hf(ids).logits, model(ids).logits, atol=1e-6)
    labels = ids.clone()
    labels[:, :3] = -100
    loss = hf(ids, labels=labels).loss
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
    assert torch.allclose(loss, model(ids, targets).loss, atol=1e-6)
    out = hf.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.0, eos_token_id=None,
                      pad_token_id=0)
    ours = generate(model, ids.tolist(), SamplingConfig(max_new_tokens=12, do_sample=False, stop_token_ids=[]))
    assert out[:, 11:].tolist() == ours


@torch.no_grad()
def test_hf_generate_with_left_padding_matches_ours(tmp_path):
    model = tiny("alibi")
    save_pretrained(model, tmp_path / "ck")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
    prompts = [[5, 9, 33, 41], [7, 8, 9, 10, 11, 12, 13]]
    ids = torch.tensor([[0, 0, 0] + prompts[0], prompts[1]])
    mask = (torch.arange(7)[None] >= torch.tensor([[3], [0]])).long()
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, repetition_penalty=1.05,
                      eos_token_id=None, pad_token_id=0)
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=6, do_sample=False, repetition_penalty=1.05,
                                                   stop_token_ids=[]))
    assert out[:, 7:].tolist() == ours


def test_official_config_loads_through_autoconfig(tmp_path):
    from tests.conftest import shared_path

    official = shared_path("baichuan2-configs", "13b-chat", "config.json")
    (tmp_path / "config.json").write_text(official.read_text())
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert config.position_embedding == "alibi" and config.num_attention_heads == 40
    assert config.to_model_config() == ModelConfig.from_name("baichuan2-13b", z_loss_weight=0.0)


def test_saved_directory_has_official_files(tmp_path):
    save_pretrained(tiny(), tmp_path / "ck")
    names = {p.name for p in (tmp_path / "ck").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= names
    gen = json.loads((tmp_path / "ck" / "generation_config.json").read_text())
    assert (gen["temperature"], gen["top_k"], gen["top_p"], gen["repetition_penalty"]) == (0.3, 5, 0.85, 1.05)
    assert (gen["user_token_id"], gen["assistant_token_id"]) == (195, 196)
