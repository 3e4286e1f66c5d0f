"""Data-derived text made inert before Streamlit or Plotly renders it.

Names, artists, file names, captions, paths, error messages (they quote paths and values),
link parameters and job logs come from files and URLs the app does not control. Streamlit
renders most text as Markdown (``st.markdown``, ``st.caption``, ``st.info``/``warning``/``error``,
image captions, widget labels and help, button labels, progress text, expander labels), so an
artist ``![b](http://host/beacon)`` would make every viewer's browser request that URL, and a
backtick in a file name would end a code span. Plotly renders a subset of HTML in titles, tick
labels and hover text (``<a href>``, ``<b>``, entities). Every data-derived string goes through
:func:`md_escape` before it reaches Markdown and through :func:`plotly_text` before it reaches a
figure; static wording around it stays Markdown.

Plain-text places need neither (``st.dataframe`` cells and headers, ``st.code``, the options of
``st.selectbox``/``st.multiselect``): escaping there would show the backslashes.
"""

from __future__ import annotations

import html
import re
import string

#: U+2060 WORD JOINER: zero width, invisible, no line break opportunity.
WORD_JOINER = "\u2060"

_PUNCTUATION = frozenset(string.punctuation)  # CommonMark: every ASCII punctuation may be escaped
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_LEADING_BLANKS = re.compile(r"^[ \t]+")
# Rewrites that Streamlit (1.67) and GFM apply to text *after* parsing, when escapes are already
# gone: emoji and logo shortcodes (":smile:", ":streamlit:"), literal autolinks ("http://x",
# "www.x", "a@b.c") and typographic arrows (" -> ", " -- ", " >= "...). A word joiner after ":"
# and "@", between "www" and ".", and inside the arrows breaks each pattern without a visible change.
_JOIN_AT = re.compile(r"(?<=[:@])|(?<=[-<>~])(?=[-<>=])|(?<=www)(?=\.)", re.IGNORECASE)


def md_escape(value: object) -> str:
    """``str(value)`` as Markdown that renders as exactly that text, on one line.

    - every ASCII punctuation character is backslash-escaped (CommonMark section 2.4), so no
      emphasis, code span, link, image, autolink, raw HTML, heading, list, table, math (``$``)
      or Streamlit directive (``:red[...]``, ``:material/...:``) can start inside the value;
    - a word joiner (U+2060) breaks the patterns rewritten after parsing (see ``_JOIN_AT``);
    - line breaks become spaces (a value never starts a new block), and leading blanks become
      character references (four would start a code block).

    The rendered text equals the input with line breaks as spaces and the invisible word joiners
    added (``tests/app/test_text.py`` renders it with a CommonMark parser).
    """
    text = _LINE_BREAK.sub(" ", str(value))
    joins = {match.start() for match in _JOIN_AT.finditer(text)}
    parts = []
    for position, ch in enumerate(text):
        if position in joins:
            parts.append(WORD_JOINER)
        parts.append("\\" + ch if ch in _PUNCTUATION else ch)
    if len(text) in joins:  # a value ending in ":" must not complete a shortcode with the text after it
        parts.append(WORD_JOINER)
    return _LEADING_BLANKS.sub(lambda m: "".join(f"&#{ord(ch)};" for ch in m.group()), "".join(parts))


def plotly_text(value: object) -> str:
    """``str(value)`` for a Plotly title, tick label, legend or hover text: ``&``, ``<`` and ``>``
    as entities, so Plotly's pseudo-HTML (``<a href>``, ``<br>``, ``<b>``) shows as typed."""
    return html.escape(str(value), quote=False)
