"""Grammar-constrained decoding: a Hugging Face model that can only write a parseable attribute object.

The grammar is the attribute format of :mod:`.format`: one JSON object ``{"key": "value", ...}``
of 1..``max_pairs`` pairs whose keys and values are non-empty strings of at most ``max_chars``
characters, without backslashes, quotes or control characters inside; JSON whitespace is
allowed where JSON allows it outside strings. Every output the constraint lets through parses
with :func:`~afmrl_dagster.attributes.format.parse_attributes`.

How it works, for any tokenizer (byte-level BPE as Qwen's, SentencePiece as Llama's):

* Each token's text is computed once per tokenizer (:func:`token_tables`, cached): the text a
  token adds after an anchor token, so SentencePiece's leading-space marker counts as a space.
  Tokens whose text is partial UTF-8 (holds U+FFFD), empty, or a special / added token are
  never allowed, except the end-of-sequence token once the object is closed.
* *String-safe* tokens (only characters allowed inside a string) extend the current key or
  value while its length stays within ``max_chars``: one vectorised comparison of a length
  table with each row's room left.
* *Structural* tokens (only ``{ } " : ,`` and whitespace) are simulated on the character
  automaton once per base state; a closing quote must be a token's first character and an
  opening quote its last, so a structural token never carries string content.
* Budget forcing: from every state, the number of tokens needed to close the object with
  single-character tokens is known; a token is allowed only if after it that many tokens, plus
  the end-of-sequence token, still fit in what is left of ``max_new_tokens``. The single-character
  path always fits, so every row closes its object and writes end-of-sequence in time.

:class:`JSONObjectLogitsProcessor` applies it during ``model.generate`` (greedy or sampled,
``num_return_sequences`` included; not beam search) by keeping each row's automaton state.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor

from .format import MAX_KEYS, MAX_VALUE_CHARS

# Base states of the character automaton.
START, OBJECT_OPEN, IN_KEY, AFTER_KEY, BEFORE_VALUE, IN_VALUE, AFTER_VALUE, AFTER_COMMA, DONE, FINISHED = range(10)
STATE_NAMES = ("START", "OBJECT_OPEN", "IN_KEY", "AFTER_KEY", "BEFORE_VALUE", "IN_VALUE", "AFTER_VALUE", "AFTER_COMMA", "DONE",
               "FINISHED")
STRING_STATES = (IN_KEY, IN_VALUE)
WHITESPACE = frozenset(" \t\n\r")
STRUCTURAL = frozenset('{}":,') | WHITESPACE
_NO_ROOM = 1 << 30  # the length of a token that never fits in a string

# Tokens still needed to close the object with single-character tokens (end-of-sequence not
# counted), by base state; string states by whether the string has a character yet.
_NEED = {START: 9, OBJECT_OPEN: 8, AFTER_KEY: 5, BEFORE_VALUE: 4, AFTER_VALUE: 1, AFTER_COMMA: 8, DONE: 0, FINISHED: 0}
_NEED_STRING = {(IN_KEY, False): 7, (IN_KEY, True): 6, (IN_VALUE, False): 3, (IN_VALUE, True): 2}
MIN_NEW_TOKENS = _NEED[START] + 1  # '{' '"' k '"' ':' '"' v '"' '}' and end-of-sequence


def tokens_needed(state: int, has_chars: bool = False) -> int:
    """Tokens needed to close the object from ``state`` with single-character tokens, end-of-sequence excluded."""
    return _NEED_STRING[(state, has_chars)] if state in STRING_STATES else _NEED[state]


def string_safe(text: str) -> bool:
    """Whether every character of ``text`` may stand inside a key or value (no quote, backslash or control character)."""
    return bool(text) and all(ch >= " " and ch not in '"\\' for ch in text) and "\ufffd" not in text


class JSONConstraintError(ValueError):
    """The constraint cannot be built: the token budget is too small, or the tokenizer lacks a needed token."""


class JSONStateError(RuntimeError):
    """A token the constraint did not allow reached it (generation bypassed the mask)."""


# ---- the character automaton ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    """What a structural token does from a base state.

    ``closes_string``: it starts with the closing quote (the string needs a character first);
    ``completes_pair``: that quote closes a value; ``comma``: it passes a comma, allowed only
    while fewer than ``max_pairs`` pairs are complete after it."""

    next_state: int
    closes_string: bool
    completes_pair: bool
    comma: bool


def simulate(state: int, text: str) -> Transition | None:
    """The transition of a structural ``text`` (only ``{ } " : ,`` and whitespace) from ``state``; ``None`` if not allowed.

    Within one token, a closing quote must come first and an opening quote last, so a token
    never carries string content; content comes from string-safe tokens."""
    if not text or any(ch not in STRUCTURAL for ch in text):
        return None
    closes = completes = comma = False
    for position, ch in enumerate(text):
        last = position == len(text) - 1
        if state in STRING_STATES:
            if position != 0 or ch != '"':
                return None
            closes, completes = True, state == IN_VALUE
            state = AFTER_KEY if state == IN_KEY else AFTER_VALUE
        elif ch in WHITESPACE:
            if state == DONE:
                return None
        elif state == START and ch == "{":
            state = OBJECT_OPEN
        elif state in (OBJECT_OPEN, AFTER_COMMA) and ch == '"':
            if not last:
                return None
            state = IN_KEY
        elif state == AFTER_KEY and ch == ":":
            state = BEFORE_VALUE
        elif state == BEFORE_VALUE and ch == '"':
            if not last:
                return None
            state = IN_VALUE
        elif state == AFTER_VALUE and ch == ",":
            state, comma = AFTER_COMMA, True
        elif state == AFTER_VALUE and ch == "}":
            state = DONE
        else:
            return None
    return Transition(state, closes, completes, comma)


@dataclass
class RowState:
    """One row's place in the grammar: base state, pairs complete, characters in the current string."""

    state: int = START
    pairs: int = 0
    chars: int = 0

    def need(self) -> int:
        return tokens_needed(self.state, self.chars > 0)


def check_text(text: str, max_pairs: int = MAX_KEYS, max_chars: int = MAX_VALUE_CHARS) -> RowState | None:
    """Run the automaton over ``text`` one character at a time: the state after it, ``None`` if
    the text leaves the grammar (the same rules the token-level constraint enforces)."""
    row = RowState()
    for ch in text:
        if row.state in STRING_STATES and ch != '"':
            if not string_safe(ch) or row.chars + 1 > max_chars:
                return None
            row.chars += 1
            continue
        if row.state in STRING_STATES and row.chars == 0:
            return None
        step = simulate(row.state, ch)
        if step is None or (step.comma and row.pairs >= max_pairs):
            return None
        row.pairs += step.completes_pair
        row.state, row.chars = step.next_state, 0
    return row


# ---- per-tokenizer tables -----------------------------------------------------------------------------------


@dataclass
class TokenTables:
    """What the constraint knows of a tokenizer's vocabulary (built once, :func:`token_tables`)."""

    vocab_size: int
    eos_token_id: int
    string_length: torch.Tensor  # [V] long: the text length of string-safe tokens, _NO_ROOM for the others
    transitions: dict[int, dict[int, Transition]]  # base state -> {token id: transition} of structural tokens
    single: dict[str, int]  # one token id for each of '{', '}', '"', ':', ',' and a one-character string token ("a")
    texts: list[str | None] = field(repr=False)  # each token's text, None when it is never allowed
    seconds: float = 0.0  # how long building took

    def structural_ids(self, state: int) -> dict[int, Transition]:
        return self.transitions.get(state, {})


def _token_texts(tokenizer, size: int) -> list[str | None]:
    """Each token's text as it reads after other text (SentencePiece's leading-space marker kept as a space)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    anchor_ids = tokenizer.encode("a", add_special_tokens=False)
    if not anchor_ids:
        raise JSONConstraintError("the tokenizer cannot encode 'a'; no anchor token for reading token texts")
    anchor = anchor_ids[-1]
    prefix = tokenizer.decode([anchor], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    pairs = tokenizer.batch_decode([[anchor, i] for i in range(size)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    texts: list[str | None] = []
    for i, text in enumerate(pairs):
        if i in special or not text.startswith(prefix):
            texts.append(None)
            continue
        text = text[len(prefix):]
        texts.append(text if text and "\ufffd" not in text else None)
    return texts


_BY_TOKENIZER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BY_NAME: dict[tuple, TokenTables] = {}


def token_tables(tokenizer) -> TokenTables:
    """The constraint's tables for ``tokenizer``, built on first use and cached per tokenizer
    object, and per name (hub id or folder), size and end-of-sequence id for tokenizers loaded again."""
    size = len(tokenizer)
    eos = tokenizer.eos_token_id
    name = getattr(tokenizer, "name_or_path", "") or ""
    key = (name, type(tokenizer).__name__, size, eos)
    cached = _BY_TOKENIZER.get(tokenizer) or (_BY_NAME.get(key) if name else None)
    if cached is not None:
        _BY_TOKENIZER[tokenizer] = cached
        return cached
    if eos is None:
        raise JSONConstraintError("the tokenizer has no end-of-sequence token: constrained output could never end")
    started = time.perf_counter()
    texts = _token_texts(tokenizer, size)
    lengths = [len(text) if text is not None and string_safe(text) else _NO_ROOM for text in texts]
    transitions: dict[int, dict[int, Transition]] = {state: {} for state in range(DONE)}
    single: dict[str, int] = {}
    for token_id, text in enumerate(texts):
        if text is None:
            continue
        if len(text) == 1 and text not in single and (text in '{}":,' or text == "a"):
            single[text] = token_id
        if all(ch in STRUCTURAL for ch in text):
            for state in range(DONE):
                step = simulate(state, text)
                if step is not None:
                    transitions[state][token_id] = step
    if "a" not in single:  # any one-character string token will do
        one_character = [i for i, length in enumerate(lengths) if length == 1]
        if one_character:
            single["a"] = one_character[0]
    missing = [ch for ch in ('{', '}', '"', ":", ",", "a") if ch not in single]
    if missing:
        what = ", ".join("a one-character string token" if ch == "a" else repr(ch) for ch in missing)
        raise JSONConstraintError(f"the tokenizer has no single-character token for {what}: the JSON constraint cannot always close the object")
    tables = TokenTables(size, int(eos), torch.tensor(lengths, dtype=torch.long), transitions, single, texts,
                         time.perf_counter() - started)
    _BY_TOKENIZER[tokenizer] = tables
    if name:
        _BY_NAME[key] = tables
    return tables


# ---- the logits processor -----------------------------------------------------------------------------------


class JSONObjectLogitsProcessor(LogitsProcessor):
    """Masks every token that would leave the attribute-object grammar (logits set to ``-inf``).

    ``prompt_length``: columns of ``input_ids`` before generation (the left-padded prompt);
    ``max_new_tokens``: the generation budget, which the object and end-of-sequence always fit
    in. One instance serves one ``generate`` call: it keeps each row's state and reads only the
    tokens added since its last call."""

    def __init__(self, tokenizer, prompt_length: int, max_new_tokens: int, max_pairs: int = MAX_KEYS,
                 max_chars: int = MAX_VALUE_CHARS, tables: TokenTables | None = None):
        if max_new_tokens < MIN_NEW_TOKENS:
            raise JSONConstraintError(f"max_new_tokens={max_new_tokens} is too small for a constrained JSON attribute object: "
                                      f'the shortest, {{"k":"v"}} and end-of-sequence, takes {MIN_NEW_TOKENS} tokens of one character')
        if not 1 <= max_pairs or max_chars < 1:
            raise JSONConstraintError(f"need max_pairs >= 1 and max_chars >= 1, got {max_pairs} and {max_chars}")
        self.tables = tables or token_tables(tokenizer)
        self.prompt_length, self.max_new_tokens = prompt_length, max_new_tokens
        self.max_pairs, self.max_chars = max_pairs, max_chars
        self.rows: list[RowState] | None = None
        self._seen = prompt_length
        self._structural_cache: dict[tuple, torch.Tensor] = {}
        self._string_length: dict[tuple, torch.Tensor] = {}

    # -- state ----------------------------------------------------------------------------------------------

    def advance(self, row: RowState, token_id: int) -> None:
        """Move ``row`` by one generated token; :class:`JSONStateError` if the token was not allowed."""
        tables = self.tables
        if row.state == FINISHED:
            return  # generate pads rows that ended
        if row.state == DONE:
            if token_id != tables.eos_token_id:
                raise JSONStateError(f"token {token_id} after the closed object; only end-of-sequence is allowed")
            row.state = FINISHED
            return
        if row.state in STRING_STATES:
            length = int(tables.string_length[token_id]) if token_id < tables.vocab_size else _NO_ROOM
            if length != _NO_ROOM:
                if row.chars + length > self.max_chars:
                    raise JSONStateError(f"token {token_id} makes a string longer than {self.max_chars} characters")
                row.chars += length
                return
        step = tables.structural_ids(row.state).get(token_id)
        if step is None or (step.closes_string and row.chars == 0) or (step.comma and row.pairs + step.completes_pair >= self.max_pairs):
            raise JSONStateError(f"token {token_id} ({self._text(token_id)!r}) is not allowed in state {STATE_NAMES[row.state]}")
        row.pairs += step.completes_pair
        row.state, row.chars = step.next_state, 0

    def _text(self, token_id: int) -> str | None:
        return self.tables.texts[token_id] if 0 <= token_id < len(self.tables.texts) else None

    def _catch_up(self, input_ids: torch.Tensor) -> None:
        if self.rows is None:
            self.rows = [RowState() for _ in range(input_ids.shape[0])]
        if len(self.rows) != input_ids.shape[0]:
            raise JSONStateError(f"{input_ids.shape[0]} rows after {len(self.rows)}: one processor per generate call, no beam search")
        new = input_ids[:, self._seen:].tolist()
        for row, tokens in zip(self.rows, new):
            for token_id in tokens:
                self.advance(row, token_id)
        self._seen = input_ids.shape[1]

    # -- masks ----------------------------------------------------------------------------------------------

    def _structural(self, row: RowState, remaining: int, device: torch.device) -> torch.Tensor:
        """Ids of the structural tokens (or end-of-sequence) allowed for ``row`` with ``remaining`` tokens left."""
        key = (row.state, row.chars > 0, row.pairs + 1 >= self.max_pairs, row.pairs >= self.max_pairs, remaining, device)
        cached = self._structural_cache.get(key)
        if cached is not None:
            return cached
        if row.state in (DONE, FINISHED):
            ids = [self.tables.eos_token_id]
        else:
            ids = []
            for token_id, step in self.tables.structural_ids(row.state).items():
                if step.closes_string and row.chars == 0:
                    continue
                if step.comma and row.pairs + step.completes_pair >= self.max_pairs:
                    continue
                if tokens_needed(step.next_state) + 1 > remaining - 1:  # after it: close the object, then end-of-sequence
                    continue
                ids.append(token_id)
        tensor = torch.tensor(ids, dtype=torch.long, device=device)
        self._structural_cache[key] = tensor
        return tensor

    def _lengths(self, device: torch.device, width: int) -> torch.Tensor:
        """The string-length table on ``device``, cut or padded (never fits) to the logits' width."""
        key = (device, width)
        if key not in self._string_length:
            lengths = self.tables.string_length[:width]
            if width > lengths.shape[0]:
                lengths = torch.cat([lengths, torch.full((width - lengths.shape[0],), _NO_ROOM, dtype=torch.long)])
            self._string_length[key] = lengths.to(device)
        return self._string_length[key]

    def allowed(self, remaining: int, device: torch.device, width: int) -> torch.Tensor:
        """``[rows, width]`` boolean mask of the tokens each row may write next, ``remaining`` tokens left (this one included)."""
        assert self.rows is not None
        room, rows, columns = [], [], []
        for index, row in enumerate(self.rows):
            fits = row.state in STRING_STATES and tokens_needed(row.state, True) + 1 <= remaining - 1
            room.append(self.max_chars - row.chars if fits else -1)
            ids = self._structural(row, remaining, device)
            rows.append(torch.full_like(ids, index))
            columns.append(ids)
        # String-safe tokens that fit in each row's string: one comparison over the vocabulary.
        mask = self._lengths(device, width)[None, :] <= torch.tensor(room, device=device)[:, None]
        rows_t, columns_t = torch.cat(rows), torch.cat(columns)
        keep = columns_t < width
        mask[rows_t[keep], columns_t[keep]] = True
        return mask
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._catch_up(input_ids)
        remaining = self.max_new_tokens - (input_ids.shape[1] - self.prompt_length)
        mask = self.allowed(remaining, scores.device, scores.shape[-1])
        return torch.where(mask, scores, torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))
