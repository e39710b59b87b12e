"""Attributes of listings: the JSON format every teacher and generator writes, the teachers
(seller attributes, an OpenAI-compatible endpoint) with their cache, the prompts, the compact
student generator and its Hugging Face VLM counterpart, and the WDC-PAVE gold attributes.
Above :mod:`afmrl_dagster.catalog` and :mod:`afmrl_dagster.vlm`; the generators' training
steps are in :mod:`afmrl_dagster.training`.

Names are imported from their submodule on first use (:mod:`afmrl_dagster.lazy_exports`).
"""

from ..lazy_exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "annotation_cache": ["AnnotationCache", "annotate_with_cache"],
    "format": ["Attributes", "attributes_to_json", "attributes_to_text", "listing_text", "normalize_attributes", "normalize_key",
               "normalize_value", "parse_attributes"],
    "generator": ["AttributeGenerator", "GeneratorConfig", "feature_tensor", "generate_attribute_texts", "load_generator",
                  "load_stored_generator", "repeat_rows", "save_generator"],
    "hf_generator": ["HFAttributeGenerator", "HFGeneratorConfig"],
    "http_teacher": ["EndpointConfig", "OpenAICompatibleTeacher", "TeacherEndpointError"],
    "pave": ["load_wdc_pave"],
    "prompts": ["STUDENT_PROMPT", "TEACHER_PROMPT", "PromptTemplate"],
    "teacher": ["ATTRIBUTE_TABLE_SCHEMA", "AttributeTeacher", "SellerAttributeTeacher", "annotate_listings", "attribute_table", "title_facts"],
    "vocabulary": ["AttributeVocabulary", "BOS_ID", "EOS_ID", "PAD_ID"],
})
