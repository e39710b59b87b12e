"""The compact student generator: frozen-tower features in, attribute JSON out, token by token.

The paper's student is a 3B MLLM; offline on CPU the project uses a small decoder instead.
The image and text features of a listing (precomputed by the frozen towers) are projected
into a few *prefix* embeddings; a causal transformer over ``[prefix; <bos>; tokens]`` writes
the attribute tokens of :class:`AttributeVocabulary`. The decoder blocks are written here
(rather than ``nn.TransformerEncoder``) so that sampling can keep a key/value cache:
re-running the whole sequence at every step made batched sampling about 12x slower
(2,048 sequences of 40 tokens on 2 CPU cores: 24 s against 2 s).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..local_files import write_folder_atomically
from .vocabulary import BOS_ID, EOS_ID, PAD_ID, STRUCTURE_IDS, AttributeVocabulary

# Added to the logits of <pad> and <bos>, which the generator must never write. Finite so that
# log-probabilities stay finite where they are gathered and then masked.
_FORBIDDEN_LOGIT = -1e4


@dataclass
class GeneratorConfig:
    """Size of the decoder. ``max_new_tokens`` bounds the output length, ``<eos>`` included."""

    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    prefix_tokens: int = 4
    max_new_tokens: int = 40
    dropout: float = 0.1
    # Number of key tokens of the vocabulary; > 0 constrains decoding to the attribute grammar
    # ({key: value, ...} then <eos>, closed in time), so every output parses. 0 = unconstrained.
    grammar_keys: int = 0

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"GeneratorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"GeneratorConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.prefix_tokens < 2:
            raise ValueError(f"GeneratorConfig.prefix_tokens must be >= 2 (image and text), got {self.prefix_tokens}")
        if self.max_new_tokens < 3:
            raise ValueError(f"GeneratorConfig.max_new_tokens must be >= 3 ('{{', '}}', <eos>), got {self.max_new_tokens}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GeneratorConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.grammar_keys < 0:
            raise ValueError(f"GeneratorConfig.grammar_keys must be >= 0, got {self.grammar_keys}")


class _DecoderBlock(nn.Module):
    """Pre-norm self-attention + MLP block that can extend a key/value cache."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.dropout = nn.Dropout(dropout)
        self.attention_dropout = dropout

    def forward(self, x: torch.Tensor, kv_buffer: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
        """``x`` ``[B, L, d]``. Without ``kv_buffer``: causal attention within ``x``. With it
        (``[2, B, heads, T, d_head]``, preallocated): the keys/values of ``x`` are written at
        ``offset`` and ``x`` attends to everything written so far; several positions at once
        only at offset 0 (the prefill)."""
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.n_heads, width // self.n_heads).permute(2, 0, 3, 1, 4)
        if kv_buffer is not None:
            if length > 1 and offset:
                raise ValueError("only the first write into a key/value buffer may hold several positions")
            kv_buffer[0, :, :, offset : offset + length] = k
            kv_buffer[1, :, :, offset : offset + length] = v
            k, v = kv_buffer[0, :, :, : offset + length], kv_buffer[1, :, :, : offset + length]
        # A single new position may see everything before it, so it needs no mask.
        attended = F.scaled_dot_product_attention(
            q, k, v, is_causal=length > 1, dropout_p=self.attention_dropout if self.training else 0.0
        )
        x = x + self.dropout(self.proj(attended.transpose(1, 2).reshape(batch, length, width)))
        return x + self.dropout(self.mlp(self.norm2(x)))


def _sample_categorical(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row by inverting the cumulative distribution: one uniform draw per row
    (``torch.multinomial`` draws one per vocabulary entry and dominated sampling time)."""
    cumulative = torch.softmax(logits.float(), dim=-1).cumsum(dim=-1)
    uniform = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device) * cumulative[:, -1:]
    # right=True never lands on a zero-probability token (its cumulative value equals its predecessor's).
    return torch.searchsorted(cumulative, uniform, right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)


def feature_tensor(value, dtype: torch.dtype, device) -> torch.Tensor:
    """``value`` (array or tensor) as a tensor of ``dtype`` on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype, device=device)


class AttributeGenerator(nn.Module):
    """Prefix-conditioned causal decoder over the attribute vocabulary.

    The image features (zeroed and replaced by a learned "no image" embedding where
    ``image_mask`` is false) become ``prefix_tokens // 2`` prefix embeddings, the text features
    the rest.
    """

    def __init__(self, vocab_size: int, image_dim: int, text_dim: int, config: GeneratorConfig | None = None):
        super().__init__()
        self.config = config = config or GeneratorConfig()
        self.vocab_size, self.image_dim, self.text_dim = vocab_size, image_dim, text_dim
        d = config.d_model
        self.image_tokens = config.prefix_tokens // 2
        self.text_tokens = config.prefix_tokens - self.image_tokens
        # Frozen-tower features differ in scale between towers: normalise before projecting.
        self.image_norm = nn.LayerNorm(image_dim)
        self.image_proj = nn.Linear(image_dim, self.image_tokens * d)
        self.no_image = nn.Parameter(torch.randn(self.image_tokens, d) * 0.02)
        self.text_norm = nn.LayerNorm(text_dim)
        self.text_proj = nn.Linear(text_dim, self.text_tokens * d)
        self.token_embedding = nn.Embedding(vocab_size, d)
        self.position_embedding = nn.Parameter(torch.randn(config.prefix_tokens + config.max_new_tokens, d) * 0.02)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_DecoderBlock(d, config.n_heads, config.dropout) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size)
        forbidden = torch.zeros(vocab_size)
        forbidden[[PAD_ID, BOS_ID]] = _FORBIDDEN_LOGIT
        self.register_buffer("forbidden", forbidden, persistent=False)
        if config.grammar_keys:
            first_key = STRUCTURE_IDS["{"] + len(STRUCTURE_IDS)
            if first_key + config.grammar_keys >= vocab_size:
                raise ValueError(f"grammar_keys={config.grammar_keys} leaves no value tokens in a vocabulary of {vocab_size}")
            token_class, follows = _grammar_tables(vocab_size, first_key, config.grammar_keys)
            self.register_buffer("token_class", token_class, persistent=False)
            self.register_buffer("grammar", follows, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _prefix(self, image, image_mask, text) -> torch.Tensor:
        device = self.device
        image = feature_tensor(image, torch.float32, device)
        image_mask = feature_tensor(image_mask, torch.bool, device)
        text = feature_tensor(text, torch.float32, device)
        batch, d = image.shape[0], self.config.d_model
        image = torch.where(image_mask[:, None], image, torch.zeros_like(image))  # a missing image may hold NaN
        image_part = self.image_proj(self.image_norm(image)).view(batch, self.image_tokens, d)
        image_part = torch.where(image_mask[:, None, None], image_part, self.no_image.expand(batch, -1, -1))
        text_part = self.text_proj(self.text_norm(text)).view(batch, self.text_tokens, d)
        return torch.cat([image_part, text_part], dim=1)

    def _logits(self, hidden: torch.Tensor, temperature: float = 1.0, previous: torch.Tensor | None = None,
                remaining: torch.Tensor | int | None = None) -> torch.Tensor:
        """Logits of the next token; with the grammar on, ``previous`` (the token just written,
        ``<bos>`` first) and ``remaining`` (tokens left, this one included) rule out what
        cannot follow or could not be closed in time."""
        logits = self.head(self.final_norm(hidden)) + self.forbidden
        if self.config.grammar_keys and previous is not None:
            logits = logits + self._grammar_penalty(previous, remaining)
        return logits / temperature if temperature != 1.0 else logits

    def _grammar_penalty(self, previous: torch.Tensor, remaining: torch.Tensor | int) -> torch.Tensor:
        """Additive ``[..., V]`` penalty: 0 where the grammar allows the token, else a large negative."""
        previous_class = self.token_class[previous]
        states = self.grammar[0][previous_class]  # [..., V] allowed when there is room for another pair
        tight = self.grammar[1][previous_class]  # allowed when only closing fits
        remaining = torch.as_tensor(remaining, device=previous.device)
        room = (remaining >= _ROOM_FOR_A_PAIR)[..., None]
        allowed = torch.where(room, states, tight)
        return torch.where(allowed, 0.0, _FORBIDDEN_LOGIT)

    def forward(self, image, image_mask, text, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Next-token logits ``[B, L, V]`` for ``input_ids`` ``[B, L]`` (which start with ``<bos>``).

        ``logits[:, j]`` predicts the token after ``input_ids[:, j]``. Padding must come after
        the content (the causal mask then keeps it from influencing earlier positions).
        """
        input_ids = input_ids.to(self.device)
        prefix = self._prefix(image, image_mask, text)
        length = prefix.shape[1] + input_ids.shape[1]
        if length > self.position_embedding.shape[0]:
            raise ValueError(f"input of {input_ids.shape[1]} tokens is longer than max_new_tokens={self.config.max_new_tokens}")
        hidden = torch.cat([prefix, self.token_embedding(input_ids)], dim=1) + self.position_embedding[:length]
        hidden = self.embedding_dropout(hidden)
        for block in self.blocks:
            hidden = block(hidden)
        remaining = self.config.max_new_tokens - torch.arange(input_ids.shape[1], device=self.device)
        return self._logits(hidden[:, prefix.shape[1] :], temperature, input_ids, remaining)

    @torch.no_grad()
    def sample(
        self,
        image,
        image_mask,
        text,
        num_samples: int = 1,
        temperature: float = 1.0,
        greedy: bool = False,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.LongTensor:
        """Write ``num_samples`` outputs per listing, all in parallel.

        Returns ``[N * num_samples, T]`` token ids (rows ``i*num_samples ... `` belong to listing
        ``i``), without ``<bos>``, right-padded with ``<pad>`` after ``<eos>``; ``T`` is at most
        ``max_new_tokens`` and a row without ``<eos>`` ran out of length. Dropout is off for the
        duration. ``use_cache=False`` re-runs the whole sequence at each step (same result, slower).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not greedy and temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        was_training = self.training
        self.eval()
        try:
            prefix = self._prefix(image, image_mask, text).repeat_interleave(num_samples, dim=0)
            rows, prefix_length = prefix.shape[0], prefix.shape[1]
            bos = torch.full((rows, 1), BOS_ID, dtype=torch.long, device=self.device)
            step_input = torch.cat([prefix, self.token_embedding(bos)], dim=1) + self.position_embedding[: prefix_length + 1]
            total = prefix_length + self.config.max_new_tokens
            head_width = self.config.d_model // self.config.n_heads
            buffers = [
                torch.empty(2, rows, self.config.n_heads, total, head_width, device=self.device) if use_cache else None
                for _ in self.blocks
            ]
            all_inputs, offset = step_input, 0
            finished = torch.zeros(rows, dtype=torch.bool, device=self.device)
            generated = []
            for step in range(self.config.max_new_tokens):
                hidden = step_input if use_cache else all_inputs
                for block, buffer in zip(self.blocks, buffers):
                    hidden = block(hidden, buffer, offset)
                offset += step_input.shape[1]
                previous = bos[:, 0] if step == 0 else generated[-1]
                logits = self._logits(hidden[:, -1], 1.0 if greedy else temperature, previous, self.config.max_new_tokens - step)
                token = logits.argmax(dim=-1) if greedy else _sample_categorical(logits, generator)
                token = token.masked_fill(finished, PAD_ID)
                generated.append(token)
                finished |= token == EOS_ID
                if bool(finished.all()) or step + 1 == self.config.max_new_tokens:
                    break
                step_input = self.token_embedding(token)[:, None] + self.position_embedding[prefix_length + 1 + step]
                if not use_cache:
                    all_inputs = torch.cat([all_inputs, step_input], dim=1)
            return torch.stack(generated, dim=1)
        finally:
            self.train(was_training)

    def token_log_probs(self, image, image_mask, text, sequences: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities ``[B, T]`` of each generated token (``<eos>`` included) and the
        mask ``[B, T]`` of real tokens; padding positions hold 0. Rows of ``image``/``text``
        must already be repeated to match ``sequences`` (:func:`repeat_rows`). Dropout applies
        in training mode: call ``eval()`` for the log-probabilities of what :meth:`sample` drew."""
        sequences = sequences.to(self.device)
        bos = torch.full((sequences.shape[0], 1), BOS_ID, dtype=torch.long, device=self.device)
        logits = self(image, image_mask, text, torch.cat([bos, sequences[:, :-1]], dim=1), temperature)
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, sequences[..., None]).squeeze(-1)
        mask = sequences != PAD_ID
        return log_probs.masked_fill(~mask, 0.0), mask

    def sequence_log_probs(self, image, image_mask, text, sequences: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Sum of the generated tokens' log-probabilities per row, ``[B]`` (padding ignored)."""
        return self.token_log_probs(image, image_mask, text, sequences, temperature)[0].sum(dim=1)


# Tokens a new pair needs before the output can close: ", key: value } <eos>" after a value,
# "key: value } <eos>" after "{" (one fewer, but one rule keeps the table small and safe).
_ROOM_FOR_A_PAIR = 6


def _grammar_tables(vocab_size: int, first_key: int, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The class of every token ``[V]`` and, per class of the previous token, which tokens may
    follow ``[2, C, V]``: with room for another pair ([0]) and when only closing fits ([1]).
    Classes, not a token-by-token table, so memory grows with V, not V squared."""
    open_, close, comma, colon = (STRUCTURE_IDS[token] for token in ("{", "}", ", ", ": "))
    classes = {"start": 0, "open": 1, "key": 2, "colon": 3, "value": 4, "comma": 5, "close": 6, "end": 7}
    token_class = torch.full((vocab_size,), classes["end"], dtype=torch.long)  # <eos> and <pad>
    token_class[BOS_ID] = classes["start"]
    token_class[open_], token_class[close] = classes["open"], classes["close"]
    token_class[comma], token_class[colon] = classes["comma"], classes["colon"]
    token_class[first_key : first_key + num_keys] = classes["key"]
    token_class[first_key + num_keys :] = classes["value"]
    keys, values = token_class == classes["key"], token_class == classes["value"]
    follows = torch.zeros(2, len(classes), vocab_size, dtype=torch.bool)
    for tight in (0, 1):
        table = follows[tight]
        table[classes["start"], open_] = True
        table[classes["open"], close] = True
        if not tight:
            table[classes["open"]] |= keys
            table[classes["value"], comma] = True
        table[classes["key"], colon] = True
        table[classes["colon"]] = values
        table[classes["value"], close] = True
        table[classes["comma"]] = keys
        table[classes["close"], EOS_ID] = True
        table[classes["end"], PAD_ID] = True  # after the end only padding (masked anyway)
    return token_class, follows


def repeat_rows(value, times: int, device=None) -> torch.Tensor:
    """Rows repeated ``times`` each (``a a b b``), matching the row order of :meth:`AttributeGenerator.sample`."""
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    return tensor.to(device).repeat_interleave(times, dim=0) if device else tensor.repeat_interleave(times, dim=0)


def save_generator(model: AttributeGenerator, vocab: AttributeVocabulary, directory: str | Path, extra_json: dict[str, dict] | None = None) -> None:
    """Write ``model.safetensors``, ``config.json`` and ``vocabulary.json`` to ``directory``, atomically.

    ``extra_json`` maps further file names to JSON-able content written in the same step (e.g.
    which towers produced the features). An existing folder is replaced as a whole.
    """
    def fill(staging: Path) -> None:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(staging / "model.safetensors"))
        config = {
            "vocab_size": model.vocab_size,
            "image_dim": model.image_dim,
            "text_dim": model.text_dim,
            "generator": dataclasses.asdict(model.config),
        }
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / "vocabulary.json").write_text(vocab.to_json())
        for name, content in (extra_json or {}).items():
            (staging / name).write_text(json.dumps(content, indent=2))

    write_folder_atomically(directory, fill)


def load_generator(directory: str | Path, device: str = "cpu") -> tuple[AttributeGenerator, AttributeVocabulary]:
    """Load what :func:`save_generator` wrote; the model comes back in eval mode."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    vocab = AttributeVocabulary.from_json((directory / "vocabulary.json").read_text())
    if len(vocab) != config["vocab_size"]:
        raise ValueError(f"{directory}: vocabulary has {len(vocab)} tokens, the model {config['vocab_size']}")
    model = AttributeGenerator(config["vocab_size"], config["image_dim"], config["text_dim"], GeneratorConfig(**config["generator"]))
    model.load_state_dict(load_file(str(directory / "model.safetensors"), device=device))
    return model.to(device).eval(), vocab


def generate_attribute_texts(
    model: AttributeGenerator,
    vocab: AttributeVocabulary,
    image,
    image_mask,
    text,
    batch_size: int = 256,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """The raw attribute text the generator writes for each listing (one per row)."""
    rows = len(image)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    texts: list[str] = []
    for start in range(0, rows, batch_size):
        end = min(start + batch_size, rows)
        sequences = model.sample(
            image[start:end], image_mask[start:end], text[start:end], temperature=temperature, greedy=greedy, generator=generator
        )
        texts.extend(vocab.decode(row) for row in sequences.tolist())
    return texts


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


__all__ = [
    "AttributeGenerator",
    "GeneratorConfig",
    "count_parameters",
    "feature_tensor",
    "generate_attribute_texts",
    "load_generator",
    "load_stored_generator",
    "repeat_rows",
    "save_generator",
]


def load_stored_generator(store, uri: str, device: str = "cpu") -> tuple[AttributeGenerator, AttributeVocabulary]:
    """Load the generator folder kept at ``uri`` of an artefact store (a manifest's ``uri``)."""
    with tempfile.TemporaryDirectory(prefix="afmrl-generator-") as scratch:
        return load_generator(store.download_directory(store.key_of(uri), Path(scratch) / "generator"), device=device)
