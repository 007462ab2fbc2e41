"""Instruction data built offline from Python's documentation topics (`pydoc_data.topics`).

    train, held_out = pydoc_instructions()      # lists of conversations (user, assistant)
    train[0] == [{"role": "user", "content": "What does the `assert` statement do?"},
                 {"role": "assistant", "content": "Assert statements are a convenient ..."}]

Every topic (``topics[name]``: a title underlined with ``*``, then sections underlined with
``=`` or ``-``) gives one item per section that opens with prose: the question names the
section ("Explain <title>."; a topic titled 'The "kw" statement' is asked "What does the `kw`
statement do?"), the answer is the first sentences of the section's first prose paragraph (at
most `max_answer_chars`, at least one sentence; a trailing ":" that introduced a code block
becomes "."). Double-quoted names become `backticked`.

Split by topic, never by section: the held-out topics are those whose text starts in the last
10% of the characters of the joined topics, the part `mmjax.data.corpora.load_corpus("pydoc")`
keeps for validation, so a model pretrained on the "pydoc" train split (experiments/llm_text.py)
has not read the held-out answers. Training items are asked in every phrasing of `PHRASINGS`;
held-out ones in one (rotating), so the questions of both splits are phrased alike.
"""

from __future__ import annotations

import re

from mmjax.data.corpora import TRAIN_FRACTION
from mmjax.errors import InputError

DATASETS = ("pydoc_instructions",)
PHRASINGS = ("Explain {title}.", "Tell me about {title}.", "What does the documentation say "
             "about {title}?")
_STATEMENT = re.compile(r'^The "([A-Za-z_]+)" statement$')
_UNDERLINE = re.compile(r"^([*=\-~^])\1{2,}$")
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z"`(*])')
_SKIP = ("Note:", "See also:", "Changed in version", "Added in version", "New in version",
         "Deprecated", "Footnotes", "Warning:")


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of every section of a topic text (the first is the topic's title)."""
    lines = text.split("\n")
    heads = [i for i in range(len(lines) - 1)
             if lines[i].strip() and _UNDERLINE.match(lines[i + 1].strip())
             and len(lines[i + 1].strip()) >= len(lines[i].strip()) - 2]
    out = []
    for k, i in enumerate(heads):
        end = heads[k + 1] if k + 1 < len(heads) else len(lines)
        out.append((lines[i].strip(), "\n".join(lines[i + 2:end])))
    return out


def first_sentences(body: str, max_chars: int = 240) -> str | None:
    """The first sentences of the first prose paragraph of `body` (None if there is none)."""
    for para in re.split(r"\n\s*\n", body):
        lines = [l for l in para.split("\n") if l.strip()]
        if not lines or lines[0].startswith((" ", "\t")) or lines[0].lstrip().startswith(
                ("+", "|", "*", "-", ">>>") + _SKIP):
            continue
        prose = " ".join(l.strip() for l in lines)
        if len(prose) < 40:
            continue
        out = ""
        for sentence in _SENTENCE_END.split(prose):
            if out and len(out) + 1 + len(sentence) > max_chars:
                break
            out = f"{out} {sentence}" if out else sentence
        if len(out) > 2 * max_chars:
            return None  # one very long sentence: no good short answer
        if out.endswith(":"):
            out = out[:-1] + "."
        return _backticks(out)
    return None


def _backticks(text: str) -> str:
    return re.sub(r'"([^"\s]{1,40})"', r"`\1`", text)


def pydoc_instructions(max_answer_chars: int = 240) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, held_out) conversations; see the module docstring."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - CPython ships it
        raise InputError(f"pydoc_data is not available: {e}") from None
    joined_cut = int(len("\n\n".join(topics.values())) * TRAIN_FRACTION)
    train, held_out = [], []
    offset = 0
    for name, text in topics.items():
        is_held_out = offset >= joined_cut
        offset += len(text) + 2
        for heading, body in sections(text):
            answer = first_sentences(body, max_answer_chars)
            if answer is None:
                continue
            m = _STATEMENT.match(heading)
            if m:
                asks = (f"What does the `{m.group(1)}` statement do?",)
            else:
                title = _backticks(heading)
                asks = tuple(p.format(title=title) for p in PHRASINGS)
            if is_held_out:
                asks = (asks[len(held_out) % len(asks)],)
            for q in asks:
                conv = [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
                (held_out if is_held_out else train).append(conv)
    return train, held_out


def load_instructions(name: str, **kwargs) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, held_out) conversations of a named instruction dataset (`DATASETS`)."""
    if name == "pydoc_instructions":
        return pydoc_instructions(**kwargs)
    raise InputError(f"unknown instruction dataset {name!r}; known: {', '.join(DATASETS)}")
