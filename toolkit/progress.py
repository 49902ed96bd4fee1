"""Progress bars for a person watching: drawn on a terminal or in a Jupyter cell, never into a pipe or a file.

A bar redrawn with carriage returns is noise in a log (`2>&1 | cat`, CI): the first draw of a bar whose total comes
later reads "0tensor [00:00, ?tensor/s]", and every redraw stays in the file. The steps' own log lines say what ran.
"""
from __future__ import annotations

from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as display_bar
from tqdm.std import tqdm as text_bar

# Jupyter's output streams are not terminals, but a notebook draws the bar as a widget that a log never holds
IN_NOTEBOOK = display_bar is not text_bar


def progress_bar(iterable=None, *, show: bool = True, leave: bool = False, **options) -> tqdm:
    """A tqdm bar over `iterable` (or updated by hand), gone once done unless `leave`; drawn only where a person
    watches (stderr a terminal, or a notebook), and nowhere with `show=False`. `options` go to tqdm."""
    # disable=None: tqdm disables the bar when the stream it writes to is not a terminal
    disable = True if not show else (False if IN_NOTEBOOK else None)
    return tqdm(iterable, disable=disable, leave=leave, **options)
