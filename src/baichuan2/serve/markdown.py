"""Markdown -> HTML for the web chat page, server-side (every asset stays local; no JS library to vendor).

CommonMark + tables via markdown-it-py with raw HTML disabled (model output is untrusted: ``<script>`` comes
out as text, ``javascript:`` links are not linked), fenced code highlighted by Pygments with inline styles.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _renderer():
    from markdown_it import MarkdownIt
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import get_lexer_by_name
    from pygments.util import ClassNotFound

    formatter = HtmlFormatter(noclasses=True, nowrap=True, style="friendly")

    def highlight_code(code: str, lang: str, _attrs) -> str:
        try:
            lexer = get_lexer_by_name(lang) if lang else None
        except ClassNotFound:
            lexer = None
        return highlight(code, lexer, formatter) if lexer else ""  # "" = markdown-it escapes it plainly

    return MarkdownIt("commonmark", {"html": False, "highlight": highlight_code}).enable("table")


def render_markdown(text: str) -> str:
    return _renderer().render(text)
