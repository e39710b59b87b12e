"""Which encoder backend a setting names (``AFMRL_ENCODER``), parsed without importing torch,
so that the definitions check the setting when they load."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import DEFAULT_ENCODER

ENCODER_KINDS = ("dual-tower", "dual-tower-finetune", "vlm2vec")

class EncoderSpecError(ValueError):
    """An encoder setting that names no backend."""


@dataclass(frozen=True)
class EncoderBackend:
    """Which encoder the pipeline trains: ``kind`` and, for ``vlm2vec``, the base ``model``."""

    kind: str = DEFAULT_ENCODER
    model: str | None = None

    @classmethod
    def parse(cls, spec: str) -> EncoderBackend:
        """``dual-tower``, ``dual-tower-finetune`` or ``vlm2vec:<hub id or local folder>``."""
        text = (spec or "").strip()
        if text in ("dual-tower", "dual-tower-finetune"):
            return cls(text)
        kind, _, model = text.partition(":")
        if kind == "vlm2vec" and model.strip():
            return cls("vlm2vec", model.strip())
        raise EncoderSpecError(
            f"encoder {spec!r} is not one of 'dual-tower', 'dual-tower-finetune' or 'vlm2vec:<hub id or local folder>'"
        )

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.model}" if self.model else self.kind

    @property
    def reads_raw_inputs(self) -> bool:
        """False only for the frozen towers, whose features the pipeline computes once and caches."""
        return self.kind != "dual-tower"
