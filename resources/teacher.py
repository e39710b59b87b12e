"""Which teacher writes the attributes: the offline seller-attribute reader, the offline visual
reader (OCR of the listing photo), a large model served behind an OpenAI-compatible endpoint, or
a Hugging Face VLM run in process."""


from typing import Callable, Optional

import dagster as dg
from pydantic import Field

from afmrl_dagster.settings import DEFAULT_TEACHER, HF_VLM_PREFIX, TEACHER_API_KEY_ENV

TEACHER_KINDS = ("seller-attributes", "visual-reader", "openai-compatible", "hf-vlm:<hub id or local folder>")


class AttributeTeacherBackend(dg.ConfigurableResource):
    """``seller-attributes`` (default, offline), ``visual-reader`` (offline OCR of the listing
    photo), ``openai-compatible`` (vLLM, TGI, a hosted API) or ``hf-vlm:<hub id or local folder>``
    (a Hugging Face image-text-to-text model in process, on the device given to :meth:`build`;
    ``revision`` is part of its cache key).

    The API key is read from the environment variable ``api_key_env`` at call time, never
    stored in configuration.
    """

    kind: str = Field(default=DEFAULT_TEACHER,
                      description="'seller-attributes', 'visual-reader', 'openai-compatible' or 'hf-vlm:<hub id or folder>'.")
    base_url: Optional[str] = Field(default=None, description="Endpoint base URL, e.g. http://gpu-box:8000/v1.")
    model: Optional[str] = Field(default=None, description="Served model name.")
    revision: str = Field(default="", description="Model revision; part of the cache key, bump it when the served weights change.")
    api_key_env: str = Field(default=TEACHER_API_KEY_ENV, description="Environment variable holding the API key.")
    concurrency: int = Field(default=8, description="Requests in flight.")
    timeout_s: float = Field(default=120.0, description="Timeout of one request.")
    max_retries: int = Field(default=5, description="Retries of a request (backoff, Retry-After honoured).")
    send_images: bool = Field(default=True, description="Attach the listing photo to the request.")
    title_facts: bool = Field(default=False, description="seller-attributes only: add quantities and model codes read from titles.")
    ocr_threads: int = Field(default=2, description="visual-reader only: threads of the OCR engine.")
    ocr_max_side: int = Field(default=512, description="visual-reader only: longest image side given to OCR, in pixels.")
    batch_size: int = Field(default=4, description="hf-vlm only: listings per forward pass.")
    max_new_tokens: int = Field(default=128, description="hf-vlm only: longest answer in tokens.")
    image_size: int = Field(default=448, description="hf-vlm only: photos are resized to a square of this side.")
    constrained_json: bool = Field(default=True, description="hf-vlm only: grammar-constrained decoding, every answer an attribute "
                                   "JSON object (needs max_new_tokens >= 10).")

    def build(self, read_image: Callable[[str], bytes], catalog=None, device: str = "cpu"):
        """The teacher; ``catalog`` (the line's listings) gives the visual reader the values it
        looks for; ``device`` is where an in-process hf-vlm teacher runs."""
        from afmrl_dagster.attributes.http_teacher import EndpointConfig, OpenAICompatibleTeacher
        from afmrl_dagster.attributes.teacher import SellerAttributeTeacher

        if self.kind == "seller-attributes":
            return SellerAttributeTeacher(title_facts=self.title_facts)
        if self.kind == "visual-reader":
            from afmrl_dagster.attributes.visual_reader import VisualReaderTeacher, lexicon_from_catalog

            lexicon = lexicon_from_catalog(catalog) if catalog is not None else None
            return VisualReaderTeacher(read_image, lexicon, threads=self.ocr_threads, max_side=self.ocr_max_side)
        if self.kind == "openai-compatible":
            if not self.base_url or not self.model:
                raise ValueError("the openai-compatible teacher needs base_url and model (AFMRL_TEACHER_URL, AFMRL_TEACHER_MODEL)")
            config = EndpointConfig(
                base_url=self.base_url, model=self.model, revision=self.revision, api_key_env=self.api_key_env,
                concurrency=self.concurrency, timeout_s=self.timeout_s, max_retries=self.max_retries, send_images=self.send_images,
            )
            return OpenAICompatibleTeacher(config, read_image=read_image)
        if self.kind.startswith(HF_VLM_PREFIX):
            from afmrl_dagster.attributes.hf_teacher import HFVLMTeacher, hf_vlm_model

            return HFVLMTeacher(hf_vlm_model(self.kind), read_image=read_image, revision=self.revision, batch_size=self.batch_size,
                                max_new_tokens=self.max_new_tokens, image_size=self.image_size, device=device,
                                send_images=self.send_images, constrained_json=self.constrained_json)
        raise ValueError(f"teacher kind must be one of {TEACHER_KINDS}, got {self.kind!r}")
