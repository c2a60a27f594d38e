"""The bundled default corpus: real text that is on every machine after `pip install`, nothing invented.

Sources (each a ``source`` tag, as Baichuan 2 mixed web/books/papers/code):
  * ``docs``  - English prose: the Python language reference shipped in ``pydoc_data``
    and the docstrings of the standard library's modules, classes and functions;
  * ``code``  - the standard library's Python source files;
  * ``dialog``- the chatterbot-corpus conversations in 26 languages (6,719 dialogues; by the data
    pipeline's language tags English 2,036, Persian 755, Japanese 568, Italian 551, Korean 453,
    Ukrainian 452, ...): not an English source - the pipeline tags each document's language;
  * ``zh``    - Chinese text: chatterbot-corpus (simplified + traditional), CPython's
    CJK encoding test texts and, when the Debian package ``fortunes-zh`` is installed,
    its Chinese fortunes (poems and sayings).

The standard library is read from the running interpreter (site-packages excluded),
so the corpus is reproducible for a given Python version.  Real corpora contain real
duplicates (licence headers, repeated dialogues, encodings test files that share a
text): the data pipeline's dedup stages have something true to find.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from baichuan2.utils.io import atomic_open

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
FORTUNES_ZH_DIRS = ("/usr/share/games/fortunes/zh", "/usr/share/games/fortunes-zh", "/usr/share/games/fortunes")


def _stdlib_files(limit_bytes: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo"):
            continue
        files.append(path)
    out, total = [], 0
    for path in files:  # deterministic: sorted, then a byte budget
        size = path.stat().st_size
        if total + size > limit_bytes:
            continue
        out.append(path)
        total += size
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def stdlib_documents(code_bytes: int = 6_000_000, docs_bytes: int = 6_000_000) -> Iterator[dict]:
    import pydoc_data.topics as topics

    for name, text in sorted(topics.topics.items()):
        yield {"text": text.strip(), "source": "docs", "doc_id": f"pydoc:{name}"}
    root = Path(sysconfig.get_paths()["stdlib"])
    doc_total = 0
    for path in _stdlib_files(code_bytes):
        source = _read(path)
        if source is None:
            continue
        rel = str(path.relative_to(root))
        yield {"text": source, "source": "code", "doc_id": f"stdlib:{rel}"}
        if doc_total > docs_bytes:
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        parts = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc.strip())
        if parts:
            text = "\n\n".join(parts)
            doc_total += len(text)
            yield {"text": text, "source": "docs", "doc_id": f"docstrings:{rel}"}


def chatterbot_documents() -> Iterator[dict]:
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data"
    for path in sorted(root.rglob("*.yml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            continue
        language = path.parent.name
        source = "zh" if language in ("chinese", "traditionalchinese") else "dialog"
        for i, conv in enumerate(data.get("conversations") or []):
            turns = [str(t).strip() for t in conv if isinstance(t, (str, int, float)) and str(t).strip()]
            if len(turns) >= 2:
                yield {"text": "\n".join(turns), "source": source, "doc_id": f"chatterbot:{language}/{path.stem}:{i}",
                       "messages": [{"role": "user" if j % 2 == 0 else "assistant", "content": t}
                                    for j, t in enumerate(turns)]}


def chinese_documents() -> Iterator[dict]:
    root = Path(sysconfig.get_paths()["stdlib"]) / "test" / "cjkencodings"
    if root.is_dir():
        for path in sorted(root.glob("*-utf8.txt")):
            text = _read(path)
            if text and any("\u4e00" <= ch <= "\u9fff" for ch in text):
                yield {"text": text.strip(), "source": "zh", "doc_id": f"cpython-cjk:{path.name}"}
    for directory in FORTUNES_ZH_DIRS:
        d = Path(directory)
        if not d.is_dir():
            continue
        for path in sorted(d.iterdir()):
            if path.suffix or not path.is_file():
                continue  # fortune files have no suffix; .dat/.u8 are indexes
            text = _read(path)
            if not text or not any("\u4e00" <= ch <= "\u9fff" for ch in text[:2000]):
                continue
            while _ANSI.search(text):  # fortunes-zh colours titles with (sometimes nested) terminal escapes
                text = _ANSI.sub("", text)
            for i, item in enumerate(text.split("\n%\n")):
                item = item.strip()
                if len(item) >= 8:
                    yield {"text": item, "source": "zh", "doc_id": f"fortunes:{path.name}:{i}"}
        break


def build_default_corpus(out_dir: str | os.PathLike, code_bytes: int = 6_000_000, docs_bytes: int = 6_000_000
                         ) -> dict[str, dict[str, int]]:
    """Write ``<out_dir>/<source>.jsonl`` files (atomically) and return docs/bytes per source.

    Dialogues are also written as ``dialogs.jsonl`` in chat form (``messages``) for SFT.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, dict[str, int]] = {}
    handles: dict[str, object] = {}
    opened = []
    try:
        for what, gen in (("standard-library documentation and source", stdlib_documents(code_bytes, docs_bytes)),
                          ("chatterbot dialogues", chatterbot_documents()), ("Chinese text", chinese_documents())):
            print(f"[corpus] reading {what}", flush=True)
            for doc in gen:
                src = doc["source"]
                if src not in handles:
                    ctx = atomic_open(out / f"{src}.jsonl", "w", encoding="utf-8")
                    handles[src] = ctx.__enter__()
                    opened.append(ctx)
                record = {k: doc[k] for k in ("text", "source", "doc_id")}
                handles[src].write(json.dumps(record, ensure_ascii=False) + "\n")
                s = stats.setdefault(src, {"docs": 0, "bytes": 0})
                s["docs"] += 1
                s["bytes"] += len(doc["text"].encode("utf-8"))
                if "messages" in doc:
                    if "dialogs" not in handles:
                        ctx = atomic_open(out / "dialogs.jsonl", "w", encoding="utf-8")
                        handles["dialogs"] = ctx.__enter__()
                        opened.append(ctx)
                    handles["dialogs"].write(json.dumps({"messages": doc["messages"], "doc_id": doc["doc_id"]},
                                                        ensure_ascii=False) + "\n")
    except BaseException as e:
        for ctx in reversed(opened):
            ctx.__exit__(type(e), e, e.__traceback__)
        raise
    for ctx in reversed(opened):
        ctx.__exit__(None, None, None)
    return stats
