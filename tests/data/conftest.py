"""A hand-built corpus where the right answer of every step is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

EN_BASE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk to light the great lamp. "
           "Ships passing the rocky headland relied on its beam to find the narrow channel into the harbour. "
           "During the winter storms he kept a logbook of every vessel that passed and every change in the "
           "weather, and those notebooks are now kept in the town museum for visitors to read.")
EN_NEAR = EN_BASE.replace("every evening", "each evening").replace("town museum", "local museum")
EN_OTHER = ("Sourdough bread needs only flour, water and salt, but the starter takes a week to become active. "
            "Bakers feed it daily and watch for bubbles before mixing the first dough of the season.")
EN_THIRD = ("Glaciers carve valleys slowly over thousands of years, leaving moraines and lakes behind them. "
            "Geologists read these landforms to reconstruct the climate of the last ice age in detail.")
ZH_BASE = ("长江是中国第一大河，全长约六千三百公里，流经青海、西藏、四川、云南、重庆、湖北、湖南、江西、安徽、江苏和上海。"
           "长江流域是中国经济最发达的地区之一，沿岸分布着许多重要的城市和港口。三峡工程是世界上最大的水利枢纽工程。")
ZH_NEAR = ZH_BASE.replace("最发达", "很发达").replace("许多重要", "很多重要")
ZH_OTHER = ("北京是中华人民共和国的首都，也是全国的政治中心和文化中心。故宫、天坛和长城每年吸引着数以百万计的游客。"
            "北京的胡同和四合院展示了老北京人的生活方式和传统文化。")
SHARED_PARA = "Remember to subscribe to our newsletter for weekly updates about science and history topics."
HARMFUL = "This forum post explains how to make a bomb from household chemicals, step by step in detail here."


def write_jsonl(path: Path, docs: list) -> None:
    with open(path, "wb") as fh:
        for d in docs:
            fh.write(d if isinstance(d, bytes) else (json.dumps(d, ensure_ascii=False) + "\n").encode())


@pytest.fixture
def known_corpus(tmp_path) -> list[str]:
    web = tmp_path / "web.jsonl"
    write_jsonl(web, [
        {"text": EN_BASE},                                   # web.jsonl:1 kept (cluster rep)
        {"text": EN_BASE},                                   # :2 exact dup of :1
        {"text": EN_NEAR},                                   # :3 near dup of :1
        {"text": EN_OTHER + "\n" + SHARED_PARA},             # :4 kept, owns the shared paragraph
        b'{"text": "broken json\n',                          # :5 malformed JSON
        b'{"text": "bad \xff\xfe utf8"}\n',                  # :6 invalid UTF-8
        {"text": EN_THIRD + "\n" + SHARED_PARA},             # :7 kept, shared paragraph cut
        {"text": HARMFUL},                                   # :8 harmful
        {"text": "   "},                                     # :9 empty after normalisation
        {"body": "no text field"},                           # :10 missing field
    ])
    zh = tmp_path / "zh.jsonl"
    write_jsonl(zh, [{"text": ZH_BASE}, {"text": ZH_NEAR}, {"text": ZH_OTHER},
                     {"text": ZH_BASE.replace("，", ",")}])  # zh:4 = full/half-width variant: exact dup
    return [f"web={web}", f"zh={zh}"]
