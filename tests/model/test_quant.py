"""Weight-only int8/int4 quantization: kernels vs dequantised references, checkpoints, CLI, NF4 conversion."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from baichuan2.cli import main
from baichuan2.model import Baichuan, ModelConfig
from baichuan2.model.checkpoint import CheckpointError, load_pretrained, save_pretrained
from baichuan2.model.generate import SamplingConfig, generate
from baichuan2.model.quant import (Int4Linear, Int8Linear, QuantConfig, dequantize_int4, pack_nibbles,
                                   quantize_int4, quantize_int8, quantize_model, unpack_nibbles)


def tiny(pos: str = "rope") -> Baichuan:
    torch.manual_seed(0)
    # FFN 192 so that group size 32/64 divides every input width
    return Baichuan(ModelConfig.from_name(f"tiny-{pos}", intermediate_size=192)).eval()


def test_nibble_packing_round_trips_and_is_documented_order():
    q = torch.randint(0, 16, (5, 8), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (5, 4) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 0], q[:, 0] | (q[:, 1] << 4))
    assert torch.equal(unpack_nibbles(packed), q)


def test_quantizers_error_is_bounded_by_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    q, scale = quantize_int8(w)
    assert (q.float() * scale[:, None] - w).abs().le(scale[:, None] / 2 + 1e-6).all()
    packed, scales, mins = quantize_int4(w, 64, search=False)
    step = scales.repeat_interleave(64, dim=1)
    plain = dequantize_int4(packed, scales, mins)
    assert (plain - w).abs().le(step / 2 + 1e-5).all()
    # the range search never does worse than min/max, per group, and clearly better on Gaussian weights
    searched = dequantize_int4(*quantize_int4(w, 64))
    per_group = lambda d: (d - w).pow(2).reshape(64, 4, 64).sum(-1)  # noqa: E731
    assert (per_group(searched) <= per_group(plain) * (1 + 1e-5)).all()
    assert per_group(searched).sum() < 0.95 * per_group(plain).sum()
    # weights already on a 4-bit grid (a Q4_1 GGUF's, dequantised) come back exactly
    grid = torch.randint(0, 16, (64, 4, 64)).float()
    grid[..., 0], grid[..., 1] = 0, 15
    on_grid = (grid * torch.rand(64, 4, 1) * 0.1 - torch.rand(64, 4, 1)).reshape(64, 256)
    assert torch.allclose(dequantize_int4(*quantize_int4(on_grid, 64)), on_grid, atol=1e-6)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_int4(w, 96)


@pytest.mark.parametrize("batch", [1, 3])
def test_int_kernels_match_the_dequantised_reference(batch):
    torch.manual_seed(0)
    w, x = torch.randn(96, 128), torch.randn(batch, 7, 128)
    for layer in (Int8Linear.from_weight(w), Int4Linear.from_weight(w, 32)):
        ref = F.linear(x.bfloat16().float(), layer.dequantize())  # the kernels take bf16 activations
        out = layer(x)
        assert out.shape == (batch, 7, 96) and out.dtype == torch.float32
        # bf16 output rounding: relative 2^-8 of the largest outputs
        assert torch.allclose(out, ref, atol=ref.abs().max().item() * 2**-7, rtol=0), type(layer).__name__


@pytest.mark.parametrize("pos", ["rope", "alibi"])
@pytest.mark.parametrize("method,tol", [("int8", 0.03), ("int4", 0.25)])
def test_quantize_save_load_gives_the_same_logits(tmp_path, pos, method, tol):
    model = tiny(pos)
    ids = torch.randint(3, 512, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    save_pretrained(model, tmp_path / "fp")
    main(["quantize", str(tmp_path / "fp"), str(tmp_path / "q"), "--method", method, "--group_size", "32",
          "--embeddings", "int8"])
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"format": "baichuan2-weight-only/1", "method": method, "group_size": 32,
                                      "head": "int8", "embeddings": "int8", "clip_search": True}
    q = load_pretrained(tmp_path / "q")
    names = set(q.state_dict())
    assert "model.layers.0.self_attn.W_pack.qweight" in names and "lm_head.qweight" in names
    assert ("model.layers.0.mlp.down_proj.mins" in names) == (method == "int4")
    with torch.no_grad():
        out = q(ids).logits
        online = load_pretrained(tmp_path / "fp", quantize=method)(ids).logits
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < tol, f"{method} logits off by {rel:.3f} of their range"
    assert rel > 0  # really quantized
    # online quantization: the defaults (int4 group size 32)
    assert (online - ref).abs().max() / ref.abs().max() < tol
    # losses and generation run through the quantized head
    loss = q(ids[:, :-1], targets=ids[:, 1:]).loss
    assert abs(loss.item() - model(ids[:, :-1], targets=ids[:, 1:]).loss.item()) < 0.1
    assert len(generate(q, [[1, 5, 9]], SamplingConfig(max_new_tokens=4, do_sample=False))[0]) == 4


def test_plain_head_is_quantized_as_it_is():
    """Models converted from Llama (SmolLM2) have a plain head: it must not be row-normalised."""
    torch.manual_seed(0)
    model = Baichuan(ModelConfig.from_name("tiny-rope", intermediate_size=192, norm_head=False)).eval()
    ids = torch.randint(3, 512, (1, 9))
    with torch.no_grad():
        ref = model(ids).logits
        out = quantize_model(model, QuantConfig(method="int8")).forward(ids).logits
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()


def test_bf16_load_of_a_quantized_checkpoint(tmp_path):
    model = tiny()
    quantize_model(model, QuantConfig(method="int4", group_size=64))
    save_pretrained(model, tmp_path / "q")
    q = load_pretrained(tmp_path / "q", dtype="bfloat16")
    ids = torch.randint(3, 512, (1, 9))
    with torch.no_grad():
        assert (q(ids).logits.float() - model(ids).logits).abs().max() < 0.1
    assert q.dtype == torch.bfloat16


def test_bad_inputs_give_one_clear_line(tmp_path):
    model = tiny()
    save_pretrained(model, tmp_path / "fp")
    with pytest.raises(SystemExit, match="group_size must be one of"):
        main(["quantize", str(tmp_path / "fp"), str(tmp_path / "q"), "--method", "int4", "--group_size", "48"])
    with pytest.raises(SystemExit, match="no int4 group size"):
        save_pretrained(Baichuan(ModelConfig.from_name("tiny-rope", hidden_size=48, num_attention_heads=4,
                                                       intermediate_size=144)), tmp_path / "odd")
        main(["quantize", str(tmp_path / "odd"), str(tmp_path / "q"), "--method", "int4"])
    main(["quantize", str(tmp_path / "fp"), str(tmp_path / "q"), "--method", "int8"])
    with pytest.raises(SystemExit, match="already quantized"):
        main(["generate", str(tmp_path / "q"), "hi", "--quantize", "int8"])
    with pytest.raises(SystemExit, match="already quantized"):
        main(["quantize", str(tmp_path / "q"), str(tmp_path / "q2")])
    with pytest.raises(CheckpointError, match="method must be"):
        load_pretrained(tmp_path / "fp", quantize="int3")


def _bnb_4bit_checkpoint(model: Baichuan, directory, nested: bool) -> dict[str, torch.Tensor]:
    """Save ``model`` the way Baichuan 2-*-Chat-4bits ship: every decoder Linear as a bitsandbytes
    NF4 weight with its serialised quant state (made by bitsandbytes itself, on CPU); returns the
    weights bitsandbytes dequantises them to."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    from safetensors.torch import save_file

    save_pretrained(model, directory, dtype=torch.bfloat16)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    expected = {}
    for key in [k for k in state if ".layers." in k and k.endswith("proj.weight") or "W_pack" in k]:
        packed, qs = bnb.quantize_4bit(state[key], blocksize=64, quant_type="nf4", compress_statistics=nested)
        expected[key] = bnb.dequantize_4bit(packed, qs)
        state[key] = packed
        state.update({f"{key}.{k}": v for k, v in qs.as_dict(packed=True).items()})
    save_file(state, str(directory / "model.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                     "bnb_4bit_use_double_quant": nested, "bnb_4bit_compute_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "checksums.sha256").unlink()  # official checkpoints carry no manifest of ours
    return expected


@pytest.mark.parametrize("nested", [True, False])
def test_official_nf4_checkpoint_loads_with_bitsandbytes_exact_weights(tmp_path, nested):
    model = tiny()
    expected = _bnb_4bit_checkpoint(model, tmp_path / "4bits", nested)
    assert len(expected) == 2 * 5
    loaded = load_pretrained(tmp_path / "4bits")
    state = loaded.state_dict()
    for key, ref in expected.items():
        assert state[key].dtype == ref.dtype and torch.equal(state[key], ref), key
    # and straight on to our int4 kernels
    ids = torch.randint(3, 512, (1, 10))
    q = load_pretrained(tmp_path / "4bits", dtype="float32", quantize="int4")
    with torch.no_grad():
        ref_logits = loaded.float()(ids).logits
        assert (q(ids).logits - ref_logits).abs().max() / ref_logits.abs().max() < 0.25


def test_corrupt_nf4_state_is_one_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    _bnb_4bit_checkpoint(tiny(), tmp_path / "4bits", nested=True)
    state = load_file(str(tmp_path / "4bits" / "model.safetensors"))
    del state["model.layers.0.mlp.up_proj.weight.absmax"]
    save_file(state, str(tmp_path / "4bits" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="up_proj.weight: quant state lacks .*absmax"):
        load_pretrained(tmp_path / "4bits")
