"""Preference pairs built offline from the pydoc instructions, with a programmatic preference.

    train, held_out = pydoc_preferences(seed=0)
    train[0] == {"prompt": [{"role": "user", "content": "Explain Methods."}],
                 "chosen": "A method is ...",          # the section's own answer
                 "rejected": "The `with` ...",         # another section's answer
                 "keyword": "Methods"}
    keyword_score("Methods are functions ...", "Methods")   # True: the answer names the topic

The preference is *answers that name the asked-about topic*. Each question of
`mmjax.data.instructions.pydoc_instructions` asks about one documentation section; its
keyword is the section title's statement name ('What does the `while` statement do?' ->
"while") or else the longest title word that is not a stop word ("Explain Immutable Sequence
Types." -> "Immutable"). A pair's chosen answer is the section's own answer and must name the
keyword (`keyword_score`: the keyword's stem, case-insensitive, at a word start); questions
whose answer does not are left out. The rejected answer is another section's answer that does
not name it, drawn with the seed from the same split (a held-out pair never shows an answer
that training pushed up as another question's chosen one). Held-out pairs come from the held-out topics (which the
pretrained and SFT'd LMs never trained on), `rejected_per_held_out` rejected answers per
question, so the 14 held-out questions give 56 pairs by default.

The same `keyword_score` scores a model's sampled answers (the fraction that names the topic):
what DPO should raise on held-out questions.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from mmjax.data.instructions import pydoc_instructions
from mmjax.errors import InputError

DATASETS = ("pydoc_preferences",)
STOP_WORDS = frozenset(
    "the a an and or of in on to for with by as is are be its their this that these those from "
    "into about statement statements types type objects object what does documentation say "
    "explain tell me basic".split())
_STATEMENT_Q = re.compile(r"`([A-Za-z_]+)` statement")
_ASK = re.compile(r"^(Explain |Tell me about |What does the documentation say about )")


def question_keyword(question: str) -> str | None:
    """The topic keyword of a pydoc instruction question (module docstring), or None."""
    m = _STATEMENT_Q.search(question)
    if m:
        return m.group(1)
    title = _ASK.sub("", question).rstrip(".?")
    words = [w for w in re.findall(r"[A-Za-z_]{3,}", title) if w.lower() not in STOP_WORDS]
    return max(words, key=len) if words else None


def keyword_score(answer: str, keyword: str) -> bool:
    """Whether `answer` names `keyword`: its stem (all but the last two letters, at least four)
    at the start of a word, case-insensitive ("Lists" matches "list", "lists")."""
    stem = keyword[: max(4, len(keyword) - 2)]
    return re.search(r"\b" + re.escape(stem), answer, re.IGNORECASE) is not None


def check_pairs(pairs: list[dict[str, Any]], what: str = "preference pairs") -> None:
    """InputError for a pair that cannot teach a preference (identical or empty answers)."""
    for i, p in enumerate(pairs):
        for key in ("prompt", "chosen", "rejected"):
            if key not in p:
                raise InputError(f"{what}[{i}] has no {key!r} (keys: {sorted(p)})")
        if not str(p["chosen"]).strip() or not str(p["rejected"]).strip():
            raise InputError(f"{what}[{i}]: an empty chosen or rejected answer")
        if p["chosen"] == p["rejected"]:
            raise InputError(f"{what}[{i}]: chosen and rejected are identical "
                             f"({p['chosen'][:60]!r}): the pair carries no preference")


def pydoc_preferences(seed: int = 0, rejected_per_held_out: int = 4,
                      max_answer_chars: int = 240) -> tuple[list[dict], list[dict]]:
    """(train, held_out) preference pairs; see the module docstring."""
    if rejected_per_held_out < 1:
        raise InputError(f"rejected_per_held_out must be >= 1, got {rejected_per_held_out}")
    train_convs, held_convs = pydoc_instructions(max_answer_chars=max_answer_chars)
    rng = np.random.default_rng(seed)

    def pairs(convs, per_question):
        # rejected answers come from the same split: a held-out pair never shows an answer
        # that training pushed up as some other question's chosen one
        answers = sorted({c[-1]["content"] for c in convs})
        out = []
        for conv in convs:
            question, chosen = conv[0]["content"], conv[-1]["content"]
            kw = question_keyword(question)
            if kw is None or not keyword_score(chosen, kw):
                continue
            others = [a for a in answers if a != chosen and not keyword_score(a, kw)]
            for j in rng.choice(len(others), size=min(per_question, len(others)), replace=False):
                out.append({"prompt": conv[:-1], "chosen": chosen, "rejected": others[int(j)],
                            "keyword": kw})
        return out

    train, held_out = pairs(train_convs, 1), pairs(held_convs, rejected_per_held_out)
    check_pairs(train, "train pairs")
    check_pairs(held_out, "held-out pairs")
    return train, held_out


def load_preferences(name: str, **kwargs) -> tuple[list[dict], list[dict]]:
    """(train, held_out) pairs of a named preference dataset (`DATASETS`)."""
    if name == "pydoc_preferences":
        return pydoc_preferences(**kwargs)
    raise InputError(f"unknown preference dataset {name!r}; known: {', '.join(DATASETS)}")


def load_pair_splits(name: str, *, seed: int = 0, rejected_per_held_out: int = 4,
                     max_answer_chars: int = 240, max_train_pairs: int | None = None
                     ) -> tuple[list[dict], list[dict]]:
    """(train, held_out) pairs of a named dataset, the training split cut to `max_train_pairs`,
    both checked (`check_pairs`) and non-empty (InputError naming the split otherwise): what the
    preference tasks (`reward`, `dpo`) train and evaluate on."""
    train, held = load_preferences(name, seed=seed, rejected_per_held_out=rejected_per_held_out,
                                   max_answer_chars=max_answer_chars)
    if max_train_pairs is not None:
        train = train[:max_train_pairs]
    if not train or not held:
        raise InputError(f"preference dataset {name!r}: {len(train)} training and {len(held)} "
                         "held-out pairs; both splits need some")
    check_pairs(train, "train pairs")
    check_pairs(held, "held-out pairs")
    return train, held
