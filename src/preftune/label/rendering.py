"""Markdown for the labeling page, rendered so that nothing in a text can act as markup.

Responses are usually Markdown (lists, code), and reading them as plain text slows annotators
down. The texts are untrusted, though: a model's output or a crowd's file can hold `<script>`,
`<img onerror=...>` or `javascript:` links. So rendering uses markdown-it-py (a maintained
CommonMark implementation) with raw HTML off, which escapes every tag as text; links are kept only
when they point to http(s) (anything else stays visible as its source text); images are not
rendered (the page's content policy would not load them anyway). The page's Content-Security-Policy
forbids inline scripts and handlers as well, so an escape that got past this would still not run.
"""

from __future__ import annotations

import html
from functools import lru_cache
from typing import Any

from preftune.errors import require

__all__ = ["render_markdown", "render_value"]

SAFE_SCHEMES = ("http://", "https://")


def _safe_link(url: str) -> bool:
    return url.strip().lower().startswith(SAFE_SCHEMES)


@lru_cache(maxsize=1)
def _renderer() -> Any:
    require("label", "markdown_it", what="the labeling page")
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable(["table", "strikethrough"])
    md.disable("image")
    md.validateLink = _safe_link

    def link_open(self, tokens, idx, options, env):  # noqa: ANN001 (markdown-it's render-rule signature)
        # Open outside the page, and tell the other site nothing about where the click came from.
        tokens[idx].attrSet("target", "_blank")
        tokens[idx].attrSet("rel", "noopener noreferrer nofollow")
        return self.renderToken(tokens, idx, options, env)

    md.add_render_rule("link_open", link_open)
    return md


def render_markdown(text: str) -> str:
    """HTML for a Markdown text: raw HTML escaped, links only to http(s), code in <pre><code>."""
    return _renderer().render(text)


def render_value(value: Any) -> str:
    """HTML for a stored prompt or response: Markdown, or chat messages as a conversation.

    A single assistant message (a response in chat form) is its content; any other list of
    messages shows each turn under its role.
    """
    if isinstance(value, str):
        return render_markdown(value)
    if len(value) == 1 and value[0]["role"] == "assistant":
        return render_markdown(value[0]["content"])
    turns = []
    for message in value:
        role = html.escape(str(message["role"]))
        turns.append(
            f'<div class="turn" data-role="{role}"><div class="role">{role}</div>'
            f'<div class="content">{render_markdown(message["content"])}</div></div>'
        )
    return '<div class="conversation">' + "".join(turns) + "</div>"
