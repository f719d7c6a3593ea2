"""Error-message helpers that keep a message short whatever the size of the input.

A message quotes what the user gave so it can be found, but a 5,000-character prompt, a list of
thousands of unknown words or a huge config value must not turn into a 9,000-character line:
quote the start, say how much there is.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: characters of a quoted value shown before it is cut
QUOTE_CHARS = 80
#: items of a list shown before "and N more"
LIST_ITEMS = 5


def short_repr(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)`, cut to about `limit` characters with the full length named.

    >>> short_repr("x" * 5000, 10)
    "'xxxxxxxx... (5000 characters)"
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters as text"
    return f"{text[:limit - 1]}... ({size})"


def some_of(items: Iterable[Any], limit: int = LIST_ITEMS, quote: bool = True) -> str:
    """The first `limit` distinct items, comma-separated, then "and N more" (N distinct items).

    >>> some_of(["a", "b", "a", "c"], 2)
    "'a', 'b' and 1 more"
    """
    unique = list(dict.fromkeys(items))
    shown = ", ".join(short_repr(x) if quote else str(x) for x in unique[:limit])
    rest = len(unique) - limit
    return f"{shown} and {rest} more" if rest > 0 else shown
