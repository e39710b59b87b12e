"""Cost of grammar-constrained decoding (afmrl_dagster.attributes.json_constraint) at Qwen's vocabulary size.

Builds, offline, a byte-level BPE tokenizer of ``--vocab`` entries (default 151,643, Qwen2's
regular vocabulary): the 256 byte symbols, then words and word pieces of generated product
text in the byte-level alphabet (with multi-byte characters, so partial UTF-8 tokens occur),
plus Qwen's special tokens. It prints how long the token tables take to build (once per
tokenizer) and what one constrained step adds per generated token for ``--rows`` rows
(batch x samples) over logits as wide as Qwen2-VL's (151,936), on random scores.

    .venv/bin/python benchmarks/json_constraint.py [--vocab 151643] [--rows 32] [--steps 64]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def byte_level_tokenizer(vocab_size: int, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from afmrl_dagster.vlm.tiny_models import QWEN2_VL_SPECIAL_TOKENS

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_symbol = {}
    for b in range(256):  # GPT-2's byte -> printable symbol map
        byte_to_symbol[b] = chr(b) if (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255) else None
    n = 0
    for b in range(256):
        if byte_to_symbol[b] is None:
            byte_to_symbol[b] = chr(256 + n)
            n += 1
    assert set(byte_to_symbol.values()) == set(alphabet)
    rng = random.Random(seed)
    words = ["red", "blue", "colour", "size", "brand", "milk", "dress", "neck", "cotton", "steel", "bottle", "ml", "leather",
             "wallet", "shoes", "tea", "organic", "größe", "farbe", "café", "ミルク", "色", "taille", "€", "%", "'s", "-"]
    vocab: dict[str, int] = {}
    for b in range(256):
        vocab[byte_to_symbol[b]] = len(vocab)
    while len(vocab) < vocab_size:
        word = rng.choice(words) + rng.choice(["", "s", "ing", "er", str(rng.randint(0, 999)), rng.choice(words)])
        start = rng.randint(0, 2)
        piece = (" " if rng.random() < 0.5 else "") + word[start:]
        data = piece.encode()
        if not data:
            continue
        data = data[: rng.randint(1, len(data))] if rng.random() < 0.1 else data  # sometimes a partial UTF-8 character
        symbols = "".join(byte_to_symbol[b] for b in data) + ("" if len(vocab) % 3 else str(len(vocab)))
        vocab.setdefault(symbols, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      extra_special_tokens=[t for t in QWEN2_VL_SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")])
    return wrapped


def main() -> None:
    from afmrl_dagster.attributes.json_constraint import JSONObjectLogitsProcessor, token_tables

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_643)
    parser.add_argument("--width", type=int, default=151_936, help="logits width (Qwen2-VL pads its vocabulary to this)")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    tokenizer = byte_level_tokenizer(args.vocab)
    print(f"tokenizer: {len(tokenizer)} tokens (built in {time.perf_counter() - started:.1f} s)")
    tables = token_tables(tokenizer)
    string_safe = int((tables.string_length < (1 << 30)).sum())
    structural = {state: len(ids) for state, ids in tables.transitions.items()}
    print(f"token tables: {tables.seconds:.2f} s; {string_safe} string-safe tokens, structural per state {structural}, "
          f"{sum(text is None for text in tables.texts)} never allowed")
    generator = torch.Generator().manual_seed(0)
    processor = JSONObjectLogitsProcessor(tokenizer, prompt_length=1, max_new_tokens=args.steps)
    ids = torch.zeros((args.rows, 1), dtype=torch.long)
    constrained, sampling = [], []
    for _ in range(args.steps):
        scores = torch.randn(args.rows, args.width, generator=generator)
        t0 = time.perf_counter()
        masked = processor(ids, scores)
        t1 = time.perf_counter()
        ids = torch.cat([ids, torch.multinomial(masked.softmax(-1), 1, generator=generator)], dim=1)
        t2 = time.perf_counter()
        constrained.append(t1 - t0)
        sampling.append(t2 - t1)
    texts = [tokenizer.decode(row[1:], skip_special_tokens=True) for row in ids.tolist()]
    from afmrl_dagster.attributes.format import parse_attributes

    valid = sum(parse_attributes(text).is_valid for text in texts)
    print(f"per step, {args.rows} rows x {args.width} logits: constraint {1e3 * statistics.median(constrained):.2f} ms median "
          f"({1e3 * max(constrained):.2f} max), softmax+sampling {1e3 * statistics.median(sampling):.2f} ms; "
          f"{valid}/{len(texts)} outputs parse; e.g. {texts[0]!r}")


if __name__ == "__main__":
    main()
