"""Issue 14, items 1 and 3: resuming never runs code from a checkpoint; corrupt or escaping files are refused."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from baichuan2.model.checkpoint import CheckpointError, load_pretrained, save_pretrained
from baichuan2.train.checkpoint import load_training_state
from baichuan2.utils.checksums import MANIFEST, ChecksumError
from baichuan2.utils.io import InputError
from baichuan2.utils.safe_pickle import UnsafePickleError

from .conftest import fresh_model_and_optimizer, pretrain_argv, tiny_model


class _Payload:
    """Pickles to ``fn(*args)``: what an attacker puts in a ``.metadata`` file."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> list:
    cmd = f"touch {marker}"
    return [
        _Payload(os.system, cmd),
        _Payload(subprocess.call, ["touch", str(marker)]),
        _Payload(eval, f"open({str(marker)!r}, 'w')"),
        _Payload(exec, f"open({str(marker)!r}, 'w')"),
        _Payload(Path.touch, marker),
        # hidden inside a legitimate-looking container, as a nested value
        {"storage_data": [_Payload(os.system, cmd)]},
    ]


def test_crafted_dcp_metadata_runs_no_code(train_checkpoint, tmp_path, monkeypatch):
    path, _ = train_checkpoint
    monkeypatch.setenv("BAICHUAN2_VERIFY_CHECKSUMS", "0")  # the unpickler alone must stop it
    marker = tmp_path / "pwned"
    payloads = _payloads(marker)
    executed, refused = 0, 0
    for payload in payloads:
        (path / ".metadata").write_bytes(pickle.dumps(payload))
        model, opt = fresh_model_and_optimizer()
        with pytest.raises(BaseException) as exc:  # torch's CheckpointException is a BaseException
            load_training_state(path, model, opt, rank=0)
        executed += marker.exists()
        marker.unlink(missing_ok=True)
        refused += isinstance(exc.value, UnsafePickleError) and ".metadata: refusing to unpickle" in str(exc.value)
    assert (executed, refused) == (0, len(payloads)), f"{executed}/{len(payloads)} payloads ran"


def test_metadata_naming_files_outside_the_checkpoint_is_refused(train_checkpoint, monkeypatch):
    path, _ = train_checkpoint
    monkeypatch.setenv("BAICHUAN2_VERIFY_CHECKSUMS", "0")
    from baichuan2.utils.safe_pickle import dcp_metadata_allowed, restricted_load

    meta = restricted_load((path / ".metadata").read_bytes(), dcp_metadata_allowed)
    for info in meta.storage_data.values():
        info.relative_path = "../../../etc/passwd"
    (path / ".metadata").write_bytes(pickle.dumps(meta))
    model, opt = fresh_model_and_optimizer()
    with pytest.raises(InputError, match="refusing path '../../../etc/passwd'"):
        load_training_state(path, model, opt, rank=0)


def test_genuine_checkpoint_still_resumes_exactly(train_checkpoint):
    path, saved = train_checkpoint
    model, opt = fresh_model_and_optimizer()
    state = load_training_state(path, model, opt, rank=0)
    assert state["step"] == 1 and state["loader"]["next_row"] == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert len(opt.state) == len(list(model.parameters()))  # AdamW moments came back


def _cli(argv) -> str:
    """Run ``baichuan2 <argv>`` in-process as the console script does; the error line it exits with, or ''."""
    from baichuan2.cli import main

    try:
        main(list(map(str, argv)))
    except SystemExit as e:
        return str(e.code)
    return ""


def test_resume_through_the_cli_refuses_a_crafted_metadata(token_shards, tmp_path, monkeypatch):
    """The reproduction from the issue: `pretrain --resume true` on a run whose .metadata carries os.system."""
    out = tmp_path / "run"
    assert _cli(pretrain_argv(token_shards, out, 2)) == ""
    (step,) = sorted((out / "checkpoints").glob("step-*"))
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(_Payload(os.system, f"touch {marker}")))
    # with checksums on (the default) the tampered file is caught first, by name
    error = _cli([*pretrain_argv(token_shards, out, 4), "--resume", "true"])
    assert ".metadata: checksum mismatch" in error and "\n" not in error
    # and without them, the restricted unpickler refuses it
    monkeypatch.setenv("BAICHUAN2_VERIFY_CHECKSUMS", "0")
    error = _cli([*pretrain_argv(token_shards, out, 4), "--resume", "true"])
    assert "refusing to unpickle posix.system" in error and "\n" not in error
    assert not marker.exists(), "the payload ran"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_training_checkpoint_are_caught(train_checkpoint):
    path, _ = train_checkpoint
    (shard,) = path.glob("*.distcp")
    size = shard.stat().st_size
    for offset in (size // 7, size // 2, size - 1):
        original = shard.read_bytes()
        _flip(shard, offset)
        model, opt = fresh_model_and_optimizer()
        with pytest.raises(ChecksumError, match=rf"{shard.name}: checksum mismatch"):
            load_training_state(path, model, opt, rank=0)
        shard.write_bytes(original)
    assert (path / MANIFEST).exists()


def test_every_flipped_byte_in_a_release_is_caught(tmp_path):
    model = tiny_model()
    directory = save_pretrained(model, tmp_path / "release")
    weights = directory / "model.safetensors"
    assert "  model.safetensors" in (directory / MANIFEST).read_text()
    original = weights.read_bytes()
    offsets = torch.randint(0, len(original), (20,), generator=torch.Generator().manual_seed(0)).tolist()
    caught = 0
    for offset in offsets:
        _flip(weights, offset)
        try:
            load_pretrained(directory)
        except CheckpointError as e:
            caught += "model.safetensors: checksum mismatch" in str(e)
        weights.write_bytes(original)
    assert caught == len(offsets)
    # the fast path: an explicit opt-out loads a file whose checksum no longer matches
    _flip(weights, len(original) - 1)
    load_pretrained(directory, verify=False)
    weights.write_bytes(original)
    reloaded = load_pretrained(directory)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


def test_checksum_env_switch(tmp_path, monkeypatch):
    directory = save_pretrained(tiny_model(), tmp_path / "release")
    _flip(directory / "model.safetensors", directory.joinpath("model.safetensors").stat().st_size - 1)
    with pytest.raises(CheckpointError):
        load_pretrained(directory)
    monkeypatch.setenv("BAICHUAN2_VERIFY_CHECKSUMS", "0")
    load_pretrained(directory)


def _sharded_release(tmp_path) -> Path:
    directory = save_pretrained(tiny_model(), tmp_path / "sharded", max_shard_size=200_000)
    assert (directory / "model.safetensors.index.json").exists()
    return directory


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_index_entries_may_not_leave_the_directory(tmp_path, kind):
    directory = _sharded_release(tmp_path)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((directory / victim).read_bytes())
    if kind == "symlink":
        (directory / victim).unlink()
        (directory / victim).symlink_to(outside)
        expected = "outside"
    else:
        target = "../outside.safetensors" if kind == "parent" else str(outside)
        index["weight_map"] = {k: (target if v == victim else v) for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))
        expected = "refusing path"
    with pytest.raises(CheckpointError, match=expected):
        load_pretrained(directory, verify=False)


def test_reward_model_value_head_is_checked(tmp_path):
    from baichuan2.align.reward import HEAD_FILE, RewardModel

    directory = RewardModel(tiny_model(), 0.0, 1.0).save(tmp_path / "rm")
    head = directory / HEAD_FILE
    _flip(head, head.stat().st_size - 1)
    with pytest.raises(CheckpointError, match=rf"{HEAD_FILE}: checksum mismatch"):
        RewardModel.load(directory)
