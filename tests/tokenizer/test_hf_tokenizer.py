"""Any Hugging Face tokenizer through `Tokenizer`, and the checkpoint's own chat template in
`build_chat_input` / `encode_chat` (ids equal transformers' apply_chat_template; exact assistant masks)."""

from __future__ import annotations

import json
import shutil

import pytest

from baichuan2.tokenizer import Tokenizer
from baichuan2.tokenizer.chat import IGNORE_INDEX, build_chat_input, encode_chat
from baichuan2.utils.io import InputError
from tests.tiny_llama import train_bpe

transformers = pytest.importorskip("transformers")
TEXTS = ["hello world  \n\t café 🙂", "  leading spaces", "北京欢迎你", "special <|im_end|> inside", ""]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"},
                {"role": "assistant", "content": "Fine, café 北京."}, {"role": "user", "content": "two plus two?"},
                {"role": "assistant", "content": "four"}]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    train_bpe(d)
    return d


def _ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def test_tokenizer_json_loads_with_special_tokens_and_round_trips(bpe_dir):
    tok = Tokenizer.from_pretrained(bpe_dir)
    hf = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    assert tok.vocab_size == len(hf) and tok.add_bos_token is False
    assert tok.special_ids == {0, 1, 2}
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a<|im_end|>")[-1] == 2  # special tokens in text are parsed, as transformers does
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.user_id == tok.assistant_id == 1  # ChatML's <|im_start|> opens every turn
    assert tok.piece_to_id("<|im_end|>") == 2 and tok.id_to_piece(2) == "<|im_end|>"


def test_save_pretrained_round_trips_through_us_and_transformers(bpe_dir, tmp_path):
    tok = Tokenizer.from_pretrained(bpe_dir)
    tok.save_pretrained(tmp_path / "out")
    back = Tokenizer.from_pretrained(tmp_path / "out")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert back.chat_template == tok.chat_template == hf.chat_template
    assert (back.bos_id, back.eos_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text) == hf.encode(text, add_special_tokens=False)


def test_chat_template_jinja_file_and_auto_tokenizer_fallback(bpe_dir, tmp_path):
    # transformers >= 4.43 stores the template in chat_template.jinja
    d = tmp_path / "jinja"
    shutil.copytree(bpe_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "chat_template.jinja").write_text(config.pop("chat_template"))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(d).chat_template == Tokenizer.from_pretrained(bpe_dir).chat_template
    # no tokenizer.json: what AutoTokenizer builds (here from vocab.json + merges.txt) is used
    auto = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    slow = tmp_path / "slow"
    auto.backend_tokenizer.model.save(str(tmp_path))
    slow.mkdir()
    shutil.move(tmp_path / "vocab.json", slow / "vocab.json")
    shutil.move(tmp_path / "merges.txt", slow / "merges.txt")
    (slow / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                            "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    try:
        fallback = Tokenizer.from_pretrained(slow)
    except InputError:
        pytest.skip("this transformers version builds no GPT-2 tokenizer from vocab.json + merges.txt")
    assert fallback.decode(fallback.encode("hello world")) == "hello world"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no tokenizer"):
        Tokenizer.from_pretrained(tmp_path / "empty")


def test_build_chat_input_equals_apply_chat_template(bpe_dir):
    tok = Tokenizer.from_pretrained(bpe_dir)
    hf = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    for messages in (CONVERSATION[:4], CONVERSATION[1:4], CONVERSATION[1:2]):
        expected = _ids(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        assert build_chat_input(tok, messages, 16, 1024) == expected
    # an assistant message last is continued, not closed
    ids = build_chat_input(tok, CONVERSATION[1:3], 16, 1024)
    assert tok.decode(ids).endswith("Fine, café 北京.")
    # too long: the oldest rounds go first, the system message and the newest round stay
    long = [CONVERSATION[0]] + [{"role": "user", "content": "word " * 30},
                                {"role": "assistant", "content": "ok"}] * 4 + [CONVERSATION[3]]
    full = build_chat_input(tok, long, 16, 4096)
    cut = build_chat_input(tok, long, 16, len(full) + 16 - 10)
    assert len(cut) < len(full) - 10 and tok.decode(cut).startswith("<|im_start|>system\nBe brief.")
    assert tok.decode(cut).endswith("two plus two?<|im_end|>\n<|im_start|>assistant\n")


def test_encode_chat_masks_exactly_the_assistant_turns(bpe_dir):
    tok = Tokenizer.from_pretrained(bpe_dir)
    hf = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    ids, targets = encode_chat(tok, CONVERSATION)
    assert ids == _ids(hf.apply_chat_template(CONVERSATION, tokenize=True))
    assert len(targets) == len(ids) and targets[-1] == IGNORE_INDEX
    assert all(t in (IGNORE_INDEX, ids[j + 1]) for j, t in enumerate(targets[:-1]))
    learned = [t for t in targets if t != IGNORE_INDEX]
    assert tok.decode(learned) == "Fine, café 北京.<|im_end|>four<|im_end|>"
    # every learned run starts right after the assistant header
    header = tok.encode("<|im_start|>assistant\n")
    starts = [j for j in range(len(targets)) if targets[j] != IGNORE_INDEX and (j == 0 or targets[j - 1] == -100)]
    assert len(starts) == 2 and all(ids[j + 1 - len(header):j + 1] == header for j in starts)
    assert encode_chat(tok, CONVERSATION, max_length=10) == (ids[:10], targets[:10])


def test_template_that_is_not_prefix_stable_is_refused(bpe_dir):
    tok = Tokenizer.from_pretrained(bpe_dir)
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endif %}{% endfor %}")  # shows only the last message
    with pytest.raises(InputError, match="prefix-stable"):
        encode_chat(tok, CONVERSATION[1:3])
    tok.chat_template = "{{ raise_exception('no system messages') }}"
    with pytest.raises(InputError, match="no system messages"):
        build_chat_input(tok, CONVERSATION[1:2])


def test_baichuan_format_without_template(tiny_tokenizer_dir):
    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir)
    assert tok.chat_template is None
    ids = build_chat_input(tok, CONVERSATION[1:2])
    assert ids[0] == tok.user_id and ids[-1] == tok.assistant_id
