"""Griffe extension for the docs build: render Sphinx cross-reference roles in docstrings as inline code.

The package's docstrings use roles such as ``:func:`default_log_dir``` and ``:class:`~.forgetting.ForgettingProxy```;
Markdown has no such syntax, so ``mkdocs build`` would print them verbatim. This turns each into a code span with
the name as written (``~`` keeps the last component only). Loaded by mkdocstrings from ``mkdocs.yml``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc):`(~?)\.?([\w.]+)(?:\(\))?`")


def _replace(match: re.Match[str]) -> str:
    name = match.group(2)
    return f"`{name.rsplit('.', 1)[-1] if match.group(1) else name}`"


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_replace, obj.docstring.value)
