import numpy as np
import pytest

from baichuan2.data.dedup_eval import jaccard, true_shingles
from baichuan2.data.exact import first_occurrence, hash_key
from baichuan2.data.minhash import MinHasher, MinHashParams, bucket_pairs, cluster, shingles
from baichuan2.data.text import detect_language, normalize, remove_spans, sentence_spans
from tests.data.conftest import EN_BASE, EN_NEAR, EN_OTHER, ZH_BASE, ZH_NEAR, ZH_OTHER


def test_sentence_spans_handle_chinese_and_english():
    text = "Hello there. How are you?\n你好。我很好！“真的吗？”他问。"
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        "Hello there.", "How are you?", "你好。", "我很好！", "“真的吗？”", "他问。"]


def test_remove_spans_keeps_indentation_and_other_text():
    text = "def f():\n    return 1\nThis line goes away.\n    indented"
    spans = [(text.index("This"), text.index("away.") + 5)]
    assert remove_spans(text, spans) == "def f():\n    return 1\n\n    indented"


def test_normalize_and_language():
    assert normalize("a\r\nb \x00\u200b\n\n\n\nc") == "a\nb\n\nc"
    assert detect_language(ZH_BASE) == "zh" and detect_language(EN_BASE) == "en" and detect_language("123 !!") == "other"
    # Full-width and half-width punctuation variants share an exact-dedup key.
    assert hash_key(ZH_BASE) == hash_key(ZH_BASE.replace("，", ","))


@pytest.mark.parametrize("a,b,lang", [(EN_BASE, EN_NEAR, "en"), (ZH_BASE, ZH_NEAR, "zh"), (EN_BASE, EN_OTHER, "en")],
                         ids=["en-near", "zh-near", "en-unrelated"])
def test_signature_agreement_estimates_true_jaccard(a, b, lang):
    params = MinHashParams(num_perm=256, bands=32, rows=8)
    sig = MinHasher(params).signatures([a, b], [lang, lang])
    true = jaccard(true_shingles(a, lang, params), true_shingles(b, lang, params))
    assert abs((sig[0] == sig[1]).mean() - true) < 0.1
    # The hashed shingle set has exactly as many members as the true one (no collisions at this size).
    assert len(shingles(a, params, lang)) == len(true_shingles(a, lang, params))


def test_batch_equals_single_document_signatures():
    docs, langs = [EN_BASE, ZH_BASE, "", "tiny", EN_OTHER, ZH_OTHER], ["en", "zh", "en", "en", "en", "zh"]
    hasher = MinHasher(MinHashParams(), chunk_shingles=17)  # tiny chunks: documents split across chunks
    batch = hasher.signatures(docs, langs)
    for i, (d, lang) in enumerate(zip(docs, langs)):
        assert (hasher.signatures([d], [lang])[0] == batch[i]).all()
    assert (batch[2] == 0xFFFFFFFF).all() and not (batch[3] == 0xFFFFFFFF).all()


def test_known_clusters():
    docs = [EN_BASE, EN_OTHER, EN_BASE, EN_NEAR, ZH_BASE, ZH_OTHER, ZH_NEAR, ""]
    langs = ["en", "en", "en", "en", "zh", "zh", "zh", "en"]
    params = MinHashParams()
    labels, edges = cluster(MinHasher(params).signatures(docs, langs), params)
    assert labels.tolist() == [0, 1, 0, 0, 4, 5, 4, 7]


def test_bucket_pairs_and_first_occurrence():
    keys = np.array([5, 0, 5, 7, 5, 7], dtype=np.uint64)  # 0 = empty document, never bucketed
    assert sorted(map(tuple, bucket_pairs(keys).tolist())) == [(0, 2), (0, 4), (3, 5)]
    h = np.array([9, 3, 9, 0, 0, 3], dtype=np.uint64)
    assert first_occurrence(h, np.array([5, 1, 2, 3, 4, 0])).tolist() == [2, 5, 2, 3, 4, 5]


def test_bad_params_are_rejected():
    with pytest.raises(ValueError, match="exceeds num_perm"):
        MinHashParams(num_perm=64, bands=16, rows=8)
