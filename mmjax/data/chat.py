"""Chat templates: conversations rendered to token ids with per-token labels for SFT.

    conv = [{"role": "user", "content": "<image>\\nWhat is shown?"},
            {"role": "assistant", "content": "A cat."}]
    r = render(conv, tokenizer, "vicuna_v1", image_seq_length=576)
    r.tokens        # int32 [T]
    r.labels        # int32 [T]: the token id where the token is trained on, IGNORE (-100) elsewhere
    r.image_starts  # int32 [n_images]: index of each image's first token
    prompt = render(conv[:1], tokenizer, "vicuna_v1", train=False, add_generation_prompt=True)
    GenerationConfig(eos_token_id=stop_ids("vicuna_v1", tokenizer), ...)

A conversation is a list of turns, dicts ``{"role": "system" | "user" | "assistant",
"content": str}`` or `Turn`s (LLaVA's ``{"from": "human" | "gpt", "value": ...}`` are accepted
too). An optional system turn comes first, then user and assistant turns alternate, starting
with the user. An image anywhere in a turn is the literal placeholder ``<image>``; each becomes
`image_seq_length` copies of the image token's id (``tokenizer.piece_to_id(image_token)``),
where a vision model's features go. Image tokens are never labelled, also in assistant turns.

Labels are aligned with `tokens`, NOT shifted: ``labels[i]`` is ``tokens[i]`` when token i is a
training target and IGNORE otherwise. Assistant content and the end-of-turn token that closes it
carry labels (a model that never learns to emit the end-of-turn token never stops, LLaVA#1521);
the system and user text, role headers, BOS, images and anything after the end-of-turn are
IGNORE. The shift to next-token targets happens when examples are packed
(`mmjax.data.sft`: the target of position i is ``labels[i + 1]``).

Templates (`TEMPLATES`):

* ``vicuna_v1``: LLaVA v1's conversation format: ``<s>SYSTEM USER: q ASSISTANT: a</s>USER: ...``
  (a space between turns, ``</s>`` closing each answer); default system prompt included.
* ``llama3``: ``<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``
  per turn; ends turns with ``<|eot_id|>`` (the tokenizer needs these four pieces).
* ``plain``: LLaVA's stage-1 pretraining: ``<s>`` + the user turn (its images) + the caption +
  ``</s>``; no roles, no system; loss on the caption. (LLaVA ends the caption with its "\\n"
  separator; here ``</s>`` ends it, so generation has one token to stop at.)
* ``minigpt4``: ``<s>###Human: <Img>[image tokens]</Img> instruction ###Assistant: answer</s>``
  (images wrapped in ``<Img>...</Img>`` text). MiniGPT-4's LLaMA-2 configs end answers with
  ``</s>``; its Vicuna-v0 configs used "###", a multi-token string no single stop id can match.

How a conversation becomes tokens: the template splits it into parts (special pieces, images,
text), each text part is tokenized on its own, so every token's label is known by construction.
Whitespace at the end of a text part is moved to the start of the next text part (sentencepiece
pieces carry their leading space, so ``"ASSISTANT:"`` + ``" answer"`` tokenizes like the whole
string, and the first answer token ``"▁answer"`` is a trained target). Then the whole rendered
text is tokenized again (split only at the special pieces and images) and must give the same
ids: a tokenizer that merges across a part boundary would shift every label after it (LLaVA's
"tokenization mismatch", #661/#1166/#1706, which silently trained those samples at loss 0); here
it is an `InputError` naming the turn and both token counts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from mmjax import configs
from mmjax.errors import ConfigError, InputError

IGNORE = -100
IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # LLaVA's data files
CONTROL_PIECES = ("<pad>", "<unk>", "<s>", "</s>")  # sentencepiece specials of every mmjax model


class ChatTokenizer(Protocol):
    """What rendering needs (`mmjax.data.tokenizer.Tokenizer` fits)."""

    def encode(self, text: str) -> list[int]: ...

    def piece_to_id(self, piece: str) -> int: ...


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclasses.dataclass(frozen=True)
class Template:
    """One conversation format. Format strings hold ``{content}`` once (``image`` holds
    ``{image}``); every special piece they use is listed in `specials`.

    begin: the piece put first ("" = none), e.g. "<s>" (the tokenizer's BOS).
    system: format of the system turn; "" = the template has no system turn.
    default_system: system prompt used when the conversation has no system turn ("" = none;
      a system turn with empty content also renders none).
    user / assistant: format of a user / an assistant turn.
    end_of_turn: the piece that closes an assistant turn (inside `assistant`, after
      ``{content}``): a trained target, and what generation stops at (`stop_ids`).
    image: how one image renders; ``{image}`` = its `image_seq_length` image tokens.
    specials: pieces that must be single tokens of the tokenizer (split out before encoding).
    """

    name: str
    begin: str
    system: str
    default_system: str
    user: str
    assistant: str
    end_of_turn: str
    image: str = "{image}"
    specials: tuple[str, ...] = ()

    def __post_init__(self):
        for field in ("user", "assistant") + (("system",) if self.system else ()):
            fmt = getattr(self, field)
            if fmt.count("{content}") != 1:
                raise ConfigError(f"template {self.name!r}: {field}={fmt!r} must hold "
                                  "'{content}' exactly once")
        if self.image.count("{image}") != 1:
            raise ConfigError(f"template {self.name!r}: image={self.image!r} must hold "
                              "'{image}' exactly once")
        if self.end_of_turn not in self.specials:
            raise ConfigError(f"template {self.name!r}: end_of_turn {self.end_of_turn!r} is "
                              f"not among its specials {self.specials}")
        if self.end_of_turn not in self.assistant.split("{content}")[1]:
            raise ConfigError(f"template {self.name!r}: end_of_turn {self.end_of_turn!r} must "
                              "follow '{content}' in the assistant format")
        if self.begin and self.begin not in self.specials:
            raise ConfigError(f"template {self.name!r}: begin {self.begin!r} is not among its "
                              f"specials {self.specials}")

    @property
    def user_symbols(self) -> tuple[str, ...]:
        """The specials a new tokenizer must get as user-defined symbols (all but the control
        pieces every sentencepiece model of mmjax has)."""
        return tuple(s for s in self.specials if s not in CONTROL_PIECES)


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's "
                  "questions.")
_L3_HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(name="vicuna_v1", begin="<s>", system="{content} ",
                 default_system=_VICUNA_SYSTEM, user="USER: {content} ",
                 assistant="ASSISTANT: {content}</s>", end_of_turn="</s>",
                 specials=("<s>", "</s>")),
        Template(name="llama3", begin="<|begin_of_text|>",
                 system=_L3_HEADER.format("system") + "{content}<|eot_id|>", default_system="",
                 user=_L3_HEADER.format("user") + "{content}<|eot_id|>",
                 assistant=_L3_HEADER.format("assistant") + "{content}<|eot_id|>",
                 end_of_turn="<|eot_id|>",
                 specials=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>")),
        Template(name="plain", begin="<s>", system="", default_system="", user="{content}",
                 assistant="{content}</s>", end_of_turn="</s>", specials=("<s>", "</s>")),
        Template(name="minigpt4", begin="<s>", system="{content} ", default_system="",
                 user="###Human: {content} ", assistant="###Assistant: {content}</s>",
                 end_of_turn="</s>", image="<Img>{image}</Img>", specials=("<s>", "</s>")),
    )
}


def get_template(template: str | Template) -> Template:
    """A `Template` by name (or the template itself); a ConfigError lists the known names."""
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ConfigError(f"unknown chat template {template!r}"
                          f"{configs.closest_name(str(template), TEMPLATES)}; known: "
                          f"{', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[template]


def special_ids(template: str | Template, tokenizer: ChatTokenizer) -> dict[str, int]:
    """piece -> id of each of the template's specials; a ConfigError names a missing one."""
    t = get_template(template)
    out = {}
    for piece in t.specials:
        try:
            out[piece] = int(tokenizer.piece_to_id(piece))
        except InputError:
            raise ConfigError(
                f"chat template {t.name!r} needs the token {piece!r}, which the tokenizer does "
                f"not have; train the tokenizer with user_defined_symbols including "
                f"{t.user_symbols} or use another template") from None
    return out


def stop_ids(template: str | Template, tokenizer: ChatTokenizer) -> tuple[int, ...]:
    """The ids generation stops at: the template's end-of-turn token, for
    ``GenerationConfig(eos_token_id=stop_ids(...))``."""
    t = get_template(template)
    return (special_ids(t, tokenizer)[t.end_of_turn],)


@dataclasses.dataclass(frozen=True)
class RenderedChat:
    """A rendered conversation (see the module docstring).

    tokens: int32 [T]. labels: int32 [T], aligned with tokens (``tokens[i]`` or IGNORE).
    image_starts: int32 [n_images], the first index of each image's block of
    `image_seq_length` image tokens. text: the rendered text, one placeholder per image.
    """

    tokens: np.ndarray
    labels: np.ndarray
    image_starts: np.ndarray
    image_seq_length: int
    text: str

    @property
    def n_images(self) -> int:
        return int(self.image_starts.shape[0])

    @property
    def image_mask(self) -> np.ndarray:
        """bool [T]: True at image tokens."""
        mask = np.zeros(self.tokens.shape, bool)
        for s in self.image_starts:
            mask[s:s + self.image_seq_length] = True
        return mask

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def as_turns(conversation: Sequence[Any]) -> list[Turn]:
    """Turns from dicts / `Turn`s, roles checked: [system], user, assistant, user, ..."""
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise InputError(f"a conversation is a list of turns, got {type(conversation).__name__}")
    turns = []
    for i, t in enumerate(conversation):
        if isinstance(t, Turn):
            role, content = t.role, t.content
        elif isinstance(t, Mapping):
            role = t.get("role", t.get("from"))
            content = t.get("content", t.get("value"))
            role = _ROLE_ALIASES.get(role, role)
        else:
            raise InputError(f"turn {i} is a {type(t).__name__}: expected a dict with 'role' "
                             "and 'content' or a Turn")
        if role not in ROLES:
            raise InputError(f"turn {i}: role {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise InputError(f"turn {i} ({role}): content must be a str, got "
                             f"{type(content).__name__}")
        turns.append(Turn(role, content))
    if not turns:
        raise InputError("the conversation has no turns")
    start = 1 if turns[0].role == "system" else 0
    for i, t in enumerate(turns[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if t.role != expected:
            raise InputError(f"turn {i} is {t.role!r} where {expected!r} was expected: after an "
                             "optional first system turn, user and assistant turns alternate, "
                             "starting with the user")
    return turns


# a part of a rendered conversation: (kind, value, labelled, turn index); kind "text" (value
# str), "special" (value a piece) or "image"; turn -1 = the template's own (BOS, default system)
_Part = tuple[str, str, bool, int]


def render(
    conversation: Sequence[Any],
    tokenizer: ChatTokenizer,
    template: str | Template,
    *,
    image_seq_length: int = 1,
    image_token: str = IMAGE_TOKEN,
    train: bool = True,
    add_generation_prompt: bool = False,
) -> RenderedChat:
    """Tokens and aligned labels of `conversation` in `template` (see the module docstring).

    train: the last turn must be the assistant's (what is trained on).
    add_generation_prompt: for inference: render up to and including the assistant header
      after the last (user) turn; all labels are IGNORE.
    Raises InputError for a malformed conversation, content holding one of the template's
    special pieces, or a tokenizer whose whole-text tokenization differs from the part-wise
    one; ConfigError when the tokenizer lacks a token the template needs.
    """
    t = get_template(template)
    if image_seq_length < 1:
        raise ConfigError(f"image_seq_length={image_seq_length}: must be >= 1")
    turns = as_turns(conversation)
    if add_generation_prompt and train:
        raise InputError("add_generation_prompt=True renders a prompt for inference: pass "
                         "train=False")
    if train and turns[-1].role != "assistant":
        raise InputError(f"train=True: the last turn (turn {len(turns) - 1}) is "
                         f"{turns[-1].role!r}, not the assistant's; nothing would be trained")
    if add_generation_prompt and turns[-1].role == "assistant":
        raise InputError("add_generation_prompt=True: the last turn is already the "
                         "assistant's; end the conversation with a user turn")
    ids = special_ids(t, tokenizer)
    for i, turn in enumerate(turns):
        for piece in t.specials:
            if piece in turn.content:
                raise InputError(f"turn {i} ({turn.role}): the content holds {piece!r}, a special "
                                 f"token of template {t.name!r}; remove it from the text")
    parts = _parts(turns, t, image_token, add_generation_prompt)
    parts = _move_trailing_spaces(parts, final=add_generation_prompt)
    has_images = any(kind == "image" for kind, *_ in parts)
    image_id = None
    if has_images:
        try:
            image_id = int(tokenizer.piece_to_id(image_token))
        except InputError:
            raise ConfigError(f"the conversation has images but the tokenizer has no "
                              f"{image_token!r} token") from None

    tokens: list[int] = []
    labels: list[int] = []
    owner: list[int] = []  # turn index of each token (for messages)
    image_starts: list[int] = []
    for kind, value, labelled, turn in parts:
        if kind == "text":
            new = [int(x) for x in tokenizer.encode(value)]
        elif kind == "special":
            new = [ids[value]]
        else:
            image_starts.append(len(tokens))
            new = [image_id] * image_seq_length
            labelled = False
        tokens += new
        labels += new if labelled else [IGNORE] * len(new)
        owner += [turn] * len(new)

    text = "".join(image_token if kind == "image" else value for kind, value, _, _ in parts)
    whole = _tokenize_whole(text, tokenizer, t, ids, image_token, image_id, image_seq_length)
    if whole != tokens:
        at = next((i for i, (a, b) in enumerate(zip(whole, tokens)) if a != b),
                  min(len(whole), len(tokens)))
        turn = owner[min(at, len(owner) - 1)] if owner else -1
        where = (f"turn {turn} ({turns[turn].role})" if turn >= 0
                 else "the template's own text")
        raise InputError(
            f"tokenization mismatch in {where} of a {t.name!r} conversation: tokenized part by "
            f"part it has {len(tokens)} tokens, tokenized whole {len(whole)}; they first differ "
            f"at token {at} ({_piece(tokenizer, tokens, at)} vs {_piece(tokenizer, whole, at)}): "
            "the tokenizer merges across a boundary between the template's text and the "
            "content, so the labels would be misaligned. Change the content's edges "
            "(whitespace, punctuation next to an image or a header) or the template")
    return RenderedChat(tokens=np.asarray(tokens, np.int32), labels=np.asarray(labels, np.int32),
                        image_starts=np.asarray(image_starts, np.int32),
                        image_seq_length=int(image_seq_length), text=text)


def _piece(tokenizer: Any, ids: list[int], i: int) -> str:
    if i >= len(ids):
        return "the end"
    to_piece = getattr(tokenizer, "id_to_piece", None)
    return repr(to_piece(ids[i])) if to_piece else str(ids[i])


def _parts(turns: list[Turn], t: Template, image_token: str,
           add_generation_prompt: bool) -> list[_Part]:
    """The conversation as template parts, with labels decided per part."""
    parts: list[_Part] = []
    if t.begin:
        parts.append(("special", t.begin, False, -1))
    start = 0
    if turns[0].role == "system":
        if not t.system and turns[0].content:
            raise InputError(f"template {t.name!r} has no system turn; drop turn 0 (system)")
        system, system_turn, start = turns[0].content, 0, 1
    else:
        system, system_turn = t.default_system, -1
    if system and t.system:
        parts += _format(t.system, t, system, image_token, False, system_turn)
    for i in range(start, len(turns)):
        turn = turns[i]
        fmt = t.user if turn.role == "user" else t.assistant
        parts += _format(fmt, t, turn.content, image_token, turn.role == "assistant", i)
    if add_generation_prompt:
        header = t.assistant.split("{content}")[0]
        parts += _format(header + "{content}", t, "", image_token, False, len(turns))
    return parts


def _format(fmt: str, t: Template, content: str, image_token: str, assistant: bool,
            turn: int) -> list[_Part]:
    """Parts of one formatted turn. In an assistant turn the content and the suffix up to and
    including the end-of-turn token are labelled."""
    prefix, suffix = fmt.split("{content}")
    out = [p + (False, turn) for p in _split(prefix, t.specials)]
    for j, chunk in enumerate(content.split(image_token)):
        if j:
            img_before, img_after = t.image.split("{image}")
            out += [p + (False, turn) for p in _split(img_before, t.specials)]
            out.append(("image", "", False, turn))
            out += [p + (False, turn) for p in _split(img_after, t.specials)]
        if chunk:
            out.append(("text", chunk, assistant, turn))
    labelled = assistant
    for kind, value in _split(suffix, t.specials):
        out.append((kind, value, labelled, turn))
        if kind == "special" and value == t.end_of_turn:
            labelled = False  # nothing after the end-of-turn token is trained on
    return out


def _split(text: str, specials: Sequence[str]) -> list[tuple[str, str]]:
    """[("text", ...) | ("special", piece)] of `text` split at the special pieces."""
    if not text:
        return []
    if not specials:
        return [("text", text)]
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    out = []
    for j, piece in enumerate(re.split(pattern, text)):
        if piece:
            out.append(("special" if j % 2 else "text", piece))
    return out


def _move_trailing_spaces(parts: list[_Part], final: bool) -> list[_Part]:
    """Spaces ending a text part move to the start of the next part when that is text too
    (sentencepiece pieces carry their leading space). With `final` (a generation prompt) the
    spaces ending the last part are dropped: the model generates them with the first word."""
    out = list(parts)
    for i in range(len(out) - 1):
        kind, value, labelled, turn = out[i]
        nxt = out[i + 1]
        if kind == "text" and nxt[0] == "text":
            stripped = value.rstrip(" ")
            if stripped != value:
                out[i] = (kind, stripped, labelled, turn)
                out[i + 1] = (nxt[0], value[len(stripped):] + nxt[1], nxt[2], nxt[3])
    if final and out and out[-1][0] == "text":
        kind, value, labelled, turn = out[-1]
        out[-1] = (kind, value.rstrip(" "), labelled, turn)
    return [p for p in out if p[0] != "text" or p[1]]


def _tokenize_whole(text: str, tokenizer: ChatTokenizer, t: Template, ids: dict[str, int],
                    image_token: str, image_id: int | None, image_seq_length: int) -> list[int]:
    """Ids of the whole rendered text: split only at specials and image placeholders, each
    text run tokenized in one call, each image expanded to `image_seq_length` tokens."""
    out: list[int] = []
    for kind, value in _split(text, tuple(t.specials) + (image_token,)):
        if kind == "text":
            out += [int(x) for x in tokenizer.encode(value)]
        elif value == image_token:
            out += [image_id] * image_seq_length
        else:
            out.append(ids[value])
    return out
