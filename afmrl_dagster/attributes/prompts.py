"""Versioned prompts, one per role: the teacher (a large MLLM) and the student (the generator
being distilled and refined). The version is part of every cache key, so changing a word of
a prompt means bumping its version."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

_KEYS_FREE = "Choose the keys yourself: short snake_case names such as brand, colour, size, material, volume, model."


@dataclass(frozen=True)
class PromptTemplate:
    """A system message and a user message with ``{title}``, ``{description}`` and ``{keys}`` slots."""

    role: str
    version: str
    system: str
    user: str

    @property
    def id(self) -> str:
        return f"{self.role}-v{self.version}"

    def render(self, title: str, description: str | None = None, keys: Iterable[str] | None = None) -> str:
        """The user message for one listing; ``keys`` restricts the attribute keys (a product
        line's vocabulary), ``None`` lets the model choose."""
        keys = sorted(keys) if keys is not None else None
        key_rule = f"Use only these keys: {', '.join(keys)}. Leave out a key you cannot tell." if keys else _KEYS_FREE
        return self.user.format(
            title=" ".join((title or "").split()) or "(none)",
            description=" ".join((description or "").split())[:1000] or "(none)",
            keys=key_rule,
        )


TEACHER_PROMPT = PromptTemplate(
    role="teacher",
    version="1",
    system=(
        "You are a product catalog expert. You list the key attributes that identify one exact "
        "product among near-identical siblings: brand, model, variant, colour, size, quantity."
    ),
    user=(
        "Product listing (the photo, when attached, shows the product).\n"
        "Title: {title}\n"
        "Description: {description}\n\n"
        "{keys}\n"
        "Answer with one JSON object of \"key\": \"value\" strings and nothing else."
    ),
)

STUDENT_PROMPT = PromptTemplate(
    role="student",
    version="1",
    system="List the key attributes of the product as one JSON object.",
    user="Title: {title}\nDescription: {description}\n{keys}\nJSON:",
)

PROMPTS = {prompt.role: prompt for prompt in (TEACHER_PROMPT, STUDENT_PROMPT)}
