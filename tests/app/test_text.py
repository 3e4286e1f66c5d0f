"""md_escape and plotly_text: data-derived text renders as exactly that text.

Markdown is rendered by markdown-it-py (CommonMark, with GFM tables and strikethrough), a
reference implementation of the grammar Streamlit's renderer (remark/micromark) follows. The
rewrites Streamlit applies to the parsed text afterwards (emoji and logo shortcodes, literal
autolinks, typographic arrows) are checked with their patterns, copied from Streamlit 1.67's
frontend bundle (StreamlitMarkdown, remark-emoji, mdast-util-gfm-autolink-literal); the
browser test (tests/e2e/test_hostile_metadata.py) checks the real renderer.
"""

from __future__ import annotations

import html
import random
import re
import string
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from dtrak_app.text import WORD_JOINER, md_escape, plotly_text

MARKDOWN = MarkdownIt("commonmark").enable(["table", "strikethrough"])

# Streamlit's rewrites of text nodes after parsing (escapes are gone by then).
REWRITES = {
    "emoji shortcode": re.compile(r":\+1:|:-1:|:[A-Za-z0-9_-]+:"),
    "streamlit logo": re.compile(r":streamlit:"),
    "arrow": re.compile(r"(^|\s)(<->|->|<-|--|>=|<=|~=)(\s|$)"),
    "autolink": re.compile(r"(https?://|www(?=\.))([-.\w]+)([^ \t\r\n]*)", re.IGNORECASE | re.ASCII),
    "email autolink": re.compile(r"([-.\w+]+)@([-\w]+(?:\.[-\w]+)+)", re.ASCII),
}
# Streamlit's tests of the raw source: remark-emoji is loaded when this matches; ":material/" is
# rewritten to ":material_" everywhere, code spans included.
EMOJI_GATE = re.compile(r":(?!material/|streamlit:)[\w+-][\w_+-]*:")

HOSTILE = [
    "![b](http://127.0.0.1:8765/beacon)", "[link](https://example.com)", "<https://example.com>",
    "<img src=x onerror=alert(1)>", "<script>alert(1)</script>", "<!-- comment -->", "`code`", "``double``",
    "a ` lone backtick", "x*_[1].png", "**bold** __bold__ *it* _it_ ~~strike~~", "# heading", "## h2",
    "- item", "+ item", "* item", "1. item", "2) item", "> quote", "---", "***", "___", "===", "| a | b |",
    "|---|---|", "$x^2$", "$$\\int$$", ":red[alert]", ":blue-background[x]", ":material/home:", ":smile:",
    ":streamlit:", ":+1:", "http://evil.example/x", "www.evil.example", "mail me@evil.example",
    "a -> b <- c <-> d -- e >= f <= g ~= h", "&amp; &lt; &#60; &#x3C;", "\\", "trailing \\", "\\*not*",
    "    indented code", "\tindented by tab", "  two leading", "line one\nline two", "para\n\n# new block",
    "crlf\r\nline", "[ref]: http://evil.example", "[ref]", "![ref]", "<div>block</div>", "foo_bar_baz",
    "WWW.SHOUT.EXAMPLE", "HTTPS://UPPER.EXAMPLE", "x\u00a0y unicode ü — «»", "emoji 😀 ok", "",
]


class _Text(HTMLParser):
    """The text of an HTML fragment and the tags it has."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))

    def handle_data(self, data):
        self.text.append(data)


def rendered(markdown: str) -> tuple[str, list]:
    parser = _Text()
    parser.feed(MARKDOWN.render(markdown))
    parser.close()
    return "".join(parser.text).rstrip("\n"), parser.tags


def one_line(value: str) -> str:
    return re.sub(r"\r\n|\r|\n", " ", value)


def corpus() -> list[str]:
    punctuation = string.punctuation
    values = list(HOSTILE) + list(punctuation)
    values += [a + b for a in punctuation for b in punctuation]  # every pair
    values += [f"a{p}b {p}c{p} {p}" for p in punctuation]
    draw = random.Random(13)
    alphabet = punctuation + "aw1 \t\nü:/." + "www"
    values += ["".join(draw.choice(alphabet) for _ in range(draw.randint(1, 24))) for _ in range(3000)]
    return values


CORPUS = corpus()


def test_embedded_escaped_text_renders_literally_with_no_markup():
    for value in CORPUS:
        text, tags = rendered(f"«{md_escape(value)}»")
        assert tags == [("p", [])], (value, tags)
        assert text.replace(WORD_JOINER, "") == f"«{one_line(value)}»", value


def test_standalone_escaped_text_renders_literally_with_no_markup():
    # A caption may be the value alone: block syntax at the start of the line must not start.
    for value in CORPUS:
        if not one_line(value).strip() or one_line(value) != one_line(value).rstrip():
            continue  # a paragraph drops trailing blanks; blank values render nothing
        text, tags = rendered(md_escape(value))
        assert tags == [("p", [])], (value, tags)
        assert text.replace(WORD_JOINER, "") == one_line(value), value


def test_no_rewrite_of_streamlit_applies_to_escaped_text():
    for value in CORPUS:
        escaped = md_escape(value)
        for where in (escaped, f"x {escaped} y"):
            text, _ = rendered(where)
            for name, pattern in REWRITES.items():
                assert pattern.search(text) is None, (name, value, where)
        assert ":material/" not in escaped and EMOJI_GATE.search(escaped) is None, value


@pytest.mark.parametrize("before, value, after", [
    ("", ":smile", ": rank 3"),  # a caption "{label}: rank": the template's colon ends a shortcode
    ("http", "://evil.example", ""),
])
def test_a_value_does_not_complete_a_rewrite_with_the_text_around_it(before, value, after):
    text, _ = rendered(before + md_escape(value) + after)
    assert not any(pattern.search(text) for pattern in REWRITES.values()), text


def test_every_rewrite_pattern_does_fire_on_the_raw_values():
    # The patterns are live: without the word joiners the hostile values would be rewritten.
    raw = " ".join(HOSTILE)
    assert all(pattern.search(raw) for pattern in REWRITES.values())


def test_non_strings_are_escaped_as_their_text():
    assert md_escape(Path("a_b/c*d.png")) == "a\\_b\\/c\\*d\\.png"
    assert md_escape(ValueError("x `y`")) == "x \\`y\\`"
    assert md_escape(3) == "3"


@pytest.mark.parametrize("value", HOSTILE + ["<a href='https://evil.example'>x</a>", "<br>", "a & b", "&lt;"])
def test_plotly_text_shows_as_typed(value):
    out = plotly_text(value)
    assert "<" not in out and ">" not in out and html.unescape(out) == value
