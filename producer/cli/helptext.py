"""How ``--help`` reads: whole paragraphs, and flags shown as flags.

With ``rich_markup_mode="rich"`` typer keeps a docstring's line breaks inside a paragraph, so a
paragraph wrapped at the source's 100 characters broke mid-sentence in an 80-column terminal
("... starts a private redis-server; starts a sim" / "worker, and ..."). Each command's help is
its docstring with every paragraph on one line; rich then wraps it to the terminal.

Typer 0.29 labels every flag's type ``<bool>`` (``--wait <bool>``), which reads as if the flag took
a value; a flag shows no type, as in click.
"""

from __future__ import annotations

import inspect

import typer
from typer.core import TyperOption


def unwrapped(doc: str) -> str:
    """``doc`` (a docstring) with each paragraph's lines joined by spaces; paragraphs stay apart."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in paragraph.splitlines()) for paragraph in paragraphs)


def tidy(app: typer.Typer) -> None:
    """Give each command of ``app`` its docstring, unwrapped, as its help (unless it has a help of its own)."""
    for info in app.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            info.help = unwrapped(info.callback.__doc__)


_display_type = TyperOption.display_type_rich


def _flag_shows_no_type(self: TyperOption, ctx) -> str | None:
    return None if self.is_flag and not self.count else _display_type(self, ctx)


TyperOption.display_type_rich = _flag_shows_no_type  # type: ignore[method-assign]
