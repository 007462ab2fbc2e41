"""A sentencepiece tokenizer: training, loading, encoding and decoding.

    tok = Tokenizer.train([train_text], "workdir/tokenizer.model", vocab_size=512)
    tok = Tokenizer.load("workdir/tokenizer.model")
    ids = tok.encode("hello", add_bos=True)           # list[int]
    batch = tok.encode(["a", "b"], add_eos=True)      # list[list[int]]
    text = tok.decode(ids)                            # pad ids are skipped
    tok.save("checkpoint/tokenizer.model")            # the .model travels with checkpoints

Trained models are lossless: no text normalization, whitespace kept as is (no extra-whitespace
removal, no dummy-prefix space) and byte fallback, so ``decode(encode(x)) == x`` for any string,
including characters never seen in training (they become UTF-8 byte pieces ``<0xNN>``).

Special ids of a trained model: ``<pad>`` = 0, ``<unk>`` = 1, ``<s>`` (BOS) = 2, ``</s>`` (EOS) = 3,
then the user-defined symbols (by default ``<image>`` and ``<|endofchunk|>``), which are always
encoded as one token each and never split. Training is deterministic: the same inputs and
settings give byte-identical ``.model`` files (fixed sampling seed, fixed thread count).

`Tokenizer` pickles by value (its serialized model), so it can be used inside grain transforms.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from mmjax.errors import ConfigError, InputError

PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE = "<pad>", "<unk>", "<s>", "</s>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Interleaved image-text markers (Flamingo / IDEFICS style): an image slot and an end-of-chunk.
DEFAULT_USER_SYMBOLS = ("<image>", "<|endofchunk|>")
MODEL_TYPES = ("bpe", "unigram")
_MAX_SENTENCE_BYTES = 1 << 16


class Tokenizer:
    """A loaded sentencepiece model plus the ids mmjax needs (see the module docstring)."""

    def __init__(self, model_proto: bytes, path: str | None = None):
        """Wrap a serialized sentencepiece ModelProto; `path` is only remembered for messages."""
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as e:
            where = f" {path}" if path else ""
            raise InputError(f"not a sentencepiece model{where}: {e}") from None
        self._proto = bytes(model_proto)
        self._processor = processor
        self.path = path

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a sentencepiece ``.model`` file; a missing or unreadable file is an InputError."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise InputError(f"tokenizer model file not found: {path}")
        with open(path, "rb") as f:
            return cls(f.read(), path=path)

    @classmethod
    def train(
        cls,
        texts: str | os.PathLike | Iterable[str | os.PathLike],
        path: str | os.PathLike,
        vocab_size: int,
        *,
        model_type: str = "bpe",
        byte_fallback: bool = True,
        user_defined_symbols: Sequence[str] = DEFAULT_USER_SYMBOLS,
        input_sentence_size: int = 0,
        character_coverage: float = 1.0,
        num_threads: int = 2,
        seed: int = 0,
        split_digits: bool = True,
    ) -> "Tokenizer":
        """Train a model on `texts` and write it to `path` (``.model`` is appended if missing).

        `texts`: strings are text held in memory; ``os.PathLike`` items (e.g. ``pathlib.Path``)
        are UTF-8 files read line by line. Each non-empty line is one training sentence (lines
        longer than 64 KiB are skipped by sentencepiece). `input_sentence_size` > 0 trains on a
        seeded random sample of that many lines (faster on big corpora); 0 uses all of them.
        `model_type` is "bpe" or "unigram". Returns the trained Tokenizer.
        """
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"tokenizer model_type={model_type!r}: expected one of {MODEL_TYPES}")
        symbols = [str(s) for s in user_defined_symbols]
        reserved = 4 + len(symbols) + (256 if byte_fallback else 0)
        if vocab_size <= reserved:
            raise ConfigError(
                f"tokenizer vocab_size={vocab_size} leaves no room for learned pieces: "
                f"{reserved} ids are reserved (4 special, {len(symbols)} user-defined"
                f"{', 256 byte-fallback' if byte_fallback else ''})"
            )
        sources = _training_sources(texts)
        path = os.fspath(path)
        if not path.endswith(".model"):
            path += ".model"
        sentences: Iterable[str] = _sentences(sources)
        if input_sentence_size > 0:
            sentences = _sample(sentences, int(input_sentence_size), int(seed))
        writer = io.BytesIO()
        spm.set_random_generator_seed(int(seed))
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=writer,
                vocab_size=int(vocab_size),
                model_type=model_type,
                byte_fallback=byte_fallback,
                user_defined_symbols=symbols,
                character_coverage=character_coverage,
                input_sentence_size=0,  # sampling, if any, was done above with our own seed
                shuffle_input_sentence=False,
                num_threads=int(num_threads),
                split_digits=split_digits,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                max_sentence_length=_MAX_SENTENCE_BYTES,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                pad_piece=PAD_PIECE, unk_piece=UNK_PIECE, bos_piece=BOS_PIECE, eos_piece=EOS_PIECE,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise ConfigError(
                f"sentencepiece training failed (model_type={model_type!r}, "
                f"vocab_size={vocab_size}): {e}"
            ) from None
        tokenizer = cls(writer.getvalue(), path=path)
        tokenizer.save(path)
        return tokenizer

    def save(self, path: str | os.PathLike) -> str:
        """Write the ``.model`` file to `path` (directories are created); returns the path."""
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(self._proto)
        os.replace(tmp, path)
        return path

    def serialized_model_proto(self) -> bytes:
        """The sentencepiece model as bytes (what `save` writes)."""
        return self._proto

    def __getstate__(self) -> dict[str, Any]:
        return {"model_proto": self._proto, "path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_proto"], path=state["path"])

    # ------------------------------------------------------------------------------- vocabulary

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        """The underlying SentencePieceProcessor."""
        return self._processor

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def pad_id(self) -> int:
        return self._processor.pad_id()

    @property
    def unk_id(self) -> int:
        return self._processor.unk_id()

    @property
    def special_ids(self) -> dict[str, int]:
        """Piece -> id of every control (pad, bos, eos), unknown and user-defined piece."""
        sp = self._processor
        user_defined = set(self._user_defined_ids())
        return {
            sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if sp.is_control(i) or sp.is_unknown(i) or i in user_defined
        }

    def _user_defined_ids(self) -> list[int]:
        """Ids of user-defined pieces (read from the model proto; needs protobuf)."""
        try:
            from sentencepiece import sentencepiece_model_pb2
        except ImportError:  # protobuf missing: only control/unknown ids are reported
            return []
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._proto)
        user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        return [i for i, p in enumerate(proto.pieces) if p.type == user_defined]

    def piece_to_id(self, piece: str) -> int:
        """Id of a vocabulary piece; an InputError if the piece is not in the vocabulary."""
        i = self._processor.piece_to_id(piece)
        if i == self.unk_id and piece != self._processor.id_to_piece(i):
            raise InputError(f"piece {piece!r} is not in the tokenizer vocabulary")
        return i

    def id_to_piece(self, i: int) -> str:
        """The vocabulary piece of id `i`."""
        self._check_ids([i])
        return self._processor.id_to_piece(int(i))

    # -------------------------------------------------------------------------- encode / decode

    def encode(
        self, text: str | Sequence[str], add_bos: bool = False, add_eos: bool = False
    ) -> list[int] | list[list[int]]:
        """Token ids of one string (list[int]) or of each string of a list (list[list[int]])."""
        if isinstance(text, str):
            return self._processor.encode(text, add_bos=add_bos, add_eos=add_eos)
        texts = list(text)
        for t in texts:
            if not isinstance(t, str):
                raise InputError(f"encode expects a str or a list of str, got {type(t).__name__}")
        return self._processor.encode(texts, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids) -> str | list[str]:
        """Text of one id sequence, or a list of texts for a list of sequences / a 2-D array.

        Pad ids are dropped; BOS/EOS decode to nothing; user-defined symbols to themselves.
        """
        if isinstance(ids, np.ndarray) and ids.ndim == 2:
            return [self.decode(row) for row in ids]
        ids = list(ids)
        if ids and isinstance(ids[0], (list, tuple, np.ndarray)):
            return [self.decode(row) for row in ids]
        ints = [int(i) for i in ids]
        self._check_ids(ints)
        pad = self.pad_id
        return self._processor.decode([i for i in ints if i != pad])

    def _check_ids(self, ids: Sequence[int]) -> None:
        n = self.vocab_size
        bad = [int(i) for i in ids if not 0 <= int(i) < n]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {n})")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def _training_sources(texts) -> list[str | os.PathLike]:
    """Normalise `texts` to a list of strings (text) and PathLikes (files); check the files."""
    if isinstance(texts, (str, os.PathLike)):
        texts = [texts]
    sources = list(texts)
    for s in sources:
        if isinstance(s, os.PathLike):
            if not os.path.isfile(s):
                raise InputError(f"tokenizer training file not found: {os.fspath(s)}")
        elif not isinstance(s, str):
            raise InputError(
                f"tokenizer training input must be str (text) or os.PathLike (file), "
                f"got {type(s).__name__}"
            )
    if not any(isinstance(s, os.PathLike) or s.strip() for s in sources):
        raise InputError("tokenizer training input is empty")
    return sources


def _sample(sentences: Iterable[str], size: int, seed: int) -> list[str]:
    """A uniform random sample of `size` sentences (reservoir sampling), in input order.

    Done here rather than by sentencepiece because its own sampling is not reproducible
    across processes.
    """
    rng = np.random.default_rng(seed)
    reservoir: list[tuple[int, str]] = []
    for n, sentence in enumerate(sentences):
        if n < size:
            reservoir.append((n, sentence))
        else:
            j = int(rng.integers(0, n + 1))
            if j < size:
                reservoir[j] = (n, sentence)
    reservoir.sort()
    return [sentence for _, sentence in reservoir]


def _sentences(sources: list[str | os.PathLike]) -> Iterator[str]:
    """The non-empty lines of every source, in order (files are streamed)."""
    for s in sources:
        if isinstance(s, os.PathLike):
            with open(s, encoding="utf-8", errors="replace") as f:
                for line in f:
                    line = line.rstrip("\n")
                    if line:
                        yield line
        else:
            for line in s.split("\n"):
                if line:
                    yield line
