"""report.md as one self-contained HTML page, rendered by markdown-it-py so the two cannot drift.

The page loads nothing: its plots are embedded as base64 PNG data URIs, its CSS is inline, and a
Content-Security-Policy forbids any other source. Raw HTML in the markdown is escaped (markdown-it's
`html: False`), and links or images are only accepted when they name one of the report's own PNG files,
so data rows quoted in the report (user text, passed through `escape_markdown`) can neither run script
nor point anywhere.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from poft.optional import require

# Every character that can start markdown inline syntax (emphasis, code, links, autolinks, raw HTML,
# entities, strikethrough) or end a table cell. CommonMark lets any ASCII punctuation be backslash-escaped.
_MARKDOWN_SPECIALS = frozenset("\\`*_[]<>|&~")

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; max-width: 1200px;
       margin: 2rem auto; padding: 0 1.5rem; }
h1, h2 { border-bottom: 1px solid #d1d9e0; padding-bottom: .3rem; }
h3 { margin-top: 1.6rem; }
table { border-collapse: collapse; display: block; overflow-x: auto; margin: 1rem 0; font-size: 13px; }
th, td { border: 1px solid #d1d9e0; padding: 4px 8px; vertical-align: top; }
td { max-width: 28rem; overflow-wrap: anywhere; }
th { background: #f6f8fa; text-align: left; }
tr:nth-child(even) td { background: #fafbfc; }
img { max-width: 100%; height: auto; }
code { background: #f6f8fa; padding: 0 .25rem; border-radius: 4px; }
"""


def escape_markdown(text: str) -> str:
    """`text` as literal inline markdown (e.g. a table cell): whitespace runs to one space, specials escaped."""
    return "".join("\\" + c if c in _MARKDOWN_SPECIALS else c for c in " ".join(text.split()))


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(markdown: str, assets: Path, title: str) -> str:
    """The HTML page of `markdown`, its images (PNG files named relative to `assets`) embedded."""
    plots = {p.name for p in assets.glob("*.png")}
    markdown_it = require("markdown_it", "report", "report.html")
    md = markdown_it.MarkdownIt("commonmark", {"html": False}).enable("table")
    md.validateLink = lambda url: url in plots
    tokens = md.parse(markdown)
    for token in tokens:
        for child in token.children or ():
            if child.type == "image":
                child.attrSet("src", _data_uri(assets / str(child.attrGet("src"))))
    body = md.renderer.render(tokens, md.options, {})
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )
