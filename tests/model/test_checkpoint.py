"""HF-layout checkpoints: round trips, official configs, .bin shards, corrupt inputs."""

from __future__ import annotations

import json

import pytest
import torch

from baichuan2.model import Baichuan, ModelConfig
from baichuan2.model.checkpoint import (CheckpointError, config_from_hf, config_to_hf, load_pretrained,
                                        load_state_dict, save_pretrained)
from tests.conftest import shared_path

OFFICIAL_NAMES = {
    "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
    *(f"model.layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.W_pack.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")),
}


def tiny(pos="rope", **kw) -> Baichuan:
    torch.manual_seed(1)
    return Baichuan(ModelConfig.from_name(f"tiny-{pos}", **kw))


def test_state_dict_names_are_the_official_ones():
    assert set(tiny().state_dict()) == OFFICIAL_NAMES


def test_official_13b_index_names_match_our_13b_layout():
    index = json.loads(shared_path("baichuan2-configs", "13b-chat", "pytorch_model.bin.index.json").read_text())
    with torch.device("meta"):
        model = Baichuan(ModelConfig.from_name("baichuan2-13b"))
    assert set(index["weight_map"]) == set(model.state_dict())
    # bf16 bytes of every tensor = the official total size
    assert index["metadata"]["total_size"] == 2 * sum(p.numel() for p in model.parameters())


def test_official_config_parses_to_13b_preset_and_keys_are_written_back():
    official = json.loads(shared_path("baichuan2-configs", "13b-chat", "config.json").read_text())
    cfg = config_from_hf(official)
    preset = ModelConfig.from_name("baichuan2-13b")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "position_embedding", "max_position_embeddings", "rms_norm_eps", "pad_token_id"):
        assert getattr(cfg, field) == getattr(preset, field), field
    ours = config_to_hf(cfg)
    assert set(official) - {"_from_model_config"} <= set(ours)
    for key in set(official) - {"_from_model_config", "transformers_version"}:
        assert ours[key] == official[key], key


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_save_load_round_trip_is_bit_exact(tmp_path, pos):
    model = tiny(pos)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    save_pretrained(model, tmp_path / "ck")
    loaded = load_pretrained(tmp_path / "ck")
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    ids = torch.randint(3, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded.eval()(ids).logits)


def test_sharded_bf16_save_and_index(tmp_path):
    model = tiny()
    save_pretrained(model, tmp_path / "ck", max_shard_size=60_000, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "ck" / s).exists() for s in shards)
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_pretrained(tmp_path / "ck")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)), k


def test_refuses_to_overwrite_without_flag(tmp_path):
    save_pretrained(tiny(), tmp_path / "ck")
    with pytest.raises(FileExistsError):
        save_pretrained(tiny(), tmp_path / "ck")
    save_pretrained(tiny("alibi"), tmp_path / "ck", overwrite=True)
    assert load_pretrained(tmp_path / "ck").config.position_embedding == "alibi"


def test_reads_sharded_pytorch_bin_safely(tmp_path):
    model = tiny()
    state = model.state_dict()
    keys = list(state)
    d = tmp_path / "bin"
    d.mkdir()
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), start=1):
        name = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: state[k] for k in part}, d / name)
        weight_map.update({k: name for k in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(config_to_hf(model.config)))
    loaded = load_pretrained(d)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_bin_with_pickled_code_is_refused(tmp_path):
    model = tiny()
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config_to_hf(model.config)))

    import os

    # a pickled reference to os.system: a plain torch.load would import it; weights_only must refuse
    torch.save({"x": os.system}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_pretrained(d)


def test_truncated_safetensors_names_the_file(tmp_path):
    save_pretrained(tiny(), tmp_path / "ck", max_shard_size=60_000)
    shard = sorted((tmp_path / "ck").glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        load_pretrained(tmp_path / "ck")


def test_garbage_header_names_the_file(tmp_path):
    save_pretrained(tiny(), tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_state_dict(tmp_path / "ck")


def test_missing_shard_and_bad_config_are_clear(tmp_path):
    save_pretrained(tiny(), tmp_path / "ck", max_shard_size=60_000)
    shard = sorted((tmp_path / "ck").glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing.*{shard.name}"):
        load_pretrained(tmp_path / "ck")
    save_pretrained(tiny(), tmp_path / "ck2")
    (tmp_path / "ck2" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(tmp_path / "ck2")
    cfg = json.loads(json.dumps(config_to_hf(tiny().config)))
    cfg["num_attention_heads"] = 5  # 64 not divisible by 5
    (tmp_path / "ck2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="divisible"):
        load_pretrained(tmp_path / "ck2")


def test_shape_mismatch_is_reported(tmp_path):
    save_pretrained(tiny(), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["intermediate_size"] = 192
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gate_proj.weight has shape"):
        load_pretrained(tmp_path / "ck")


def test_crash_during_save_leaves_no_directory(tmp_path, monkeypatch):
    import baichuan2.model.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "atomic_write_json", boom)
    with pytest.raises(RuntimeError):
        save_pretrained(tiny(), tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    assert not list(tmp_path.iterdir())  # the temporary directory is gone too
