"""Language identification: real tags for every language, a recipe keep-list, the mix in the report."""

from __future__ import annotations

import json

import pyarrow.dataset as ds

from baichuan2.data.embed import EmbedArgs
from baichuan2.data.language import LanguageArgs, LanguageTagger, identify, shingle_group
from baichuan2.data.pipeline import DataRecipe, run_pipeline

SAMPLES = {
    "en": "The weather is lovely today, so we are going for a long walk along the river after lunch.",
    "zh": "今天天气很好，我们吃完午饭以后打算沿着河边散步，然后去图书馆看书。",
    "ja": "今日はとても良い天気なので、昼ご飯の後に川沿いを散歩して、図書館で本を読むつもりです。",
    "ko": "오늘은 날씨가 정말 좋아서 점심을 먹은 후에 강을 따라 산책하고 도서관에 갈 거예요.",
    "fr": "Il fait très beau aujourd'hui, alors nous allons faire une longue promenade le long de la rivière.",
    "de": "Das Wetter ist heute wunderbar, deshalb machen wir nach dem Mittagessen einen langen Spaziergang.",
    "fa": "امروز هوا خیلی خوب است، بنابراین بعد از ناهار در کنار رودخانه قدم می‌زنیم و به کتابخانه می‌رویم.",
    "uk": "Сьогодні чудова погода, тому після обіду ми підемо на довгу прогулянку вздовж річки.",
}


def test_identify_tells_japanese_and_korean_from_chinese():
    assert {lang: identify(text) for lang, text in SAMPLES.items()} == {lang: lang for lang in SAMPLES}
    assert identify("12345 !!! ...") == "und"
    assert identify("你好\n嗨") == "zh"  # langid says yue (Cantonese) for short Mandarin; folded to zh


def test_script_rule_is_kept_for_comparison_and_code_is_untagged():
    script = LanguageTagger(LanguageArgs(identifier="script"))
    assert script.tag(SAMPLES["ja"], "dialog") == "zh"  # the old rule's mistake, kept only on request
    tagger = LanguageTagger(LanguageArgs(keep=["zh", "en"]))
    assert tagger.tag("def f(x):\n    return x + 1\n", "code") == "code"
    assert tagger.reject_reason("ja", "dialog") == "language:ja" and tagger.reject_reason("code", "code") is None
    assert shingle_group("ja") == "zh" and shingle_group("ko") == "en"


def test_keep_list_rejects_other_languages_and_the_report_shows_the_mix(tmp_path):
    path = tmp_path / "dialog.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in SAMPLES.values()))
    r = DataRecipe(inputs=[str(path)], out_dir=str(tmp_path / "run"), workers=1, embed=EmbedArgs(enabled=False),
                   language=LanguageArgs(keep=["zh", "en"]))
    report = run_pipeline(r)
    out = ds.dataset(str(tmp_path / "run" / "output"), format="parquet").to_table().to_pylist()
    assert sorted(row["lang"] for row in out) == ["en", "zh"]
    rejects = ds.dataset(str(tmp_path / "run" / "rejects"), format="parquet").to_table().to_pylist()
    assert sorted(x["reason"] for x in rejects if x["step"] == "language") == [
        "language:de", "language:fa", "language:fr", "language:ja", "language:ko", "language:uk"]
    assert report["languages_tagged"] == {lang: 1 for lang in SAMPLES}
    assert report["steps"]["language"]["reasons"] == {f"language:{x}": 1 for x in ("de", "fa", "fr", "ja", "ko", "uk")}
    assert report["output_by_language"] == {"en": 1, "zh": 1}
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Languages in the output" in md and "| zh | 1 | 1 | 50.0% |" in md
    # The tokenizer's compression figures group by the tag the pipeline wrote, not by a guess of their own.
    from baichuan2.tokenizer.corpus import iter_documents
    from baichuan2.tokenizer.stats import language

    docs = list(iter_documents(str(tmp_path / "run" / "output")))
    assert sorted(d["lang"] for d in docs) == ["en", "zh"]
    assert language({"text": SAMPLES["zh"], "lang": "ja"}) == "ja" and language(SAMPLES["ja"]) == "ja"
