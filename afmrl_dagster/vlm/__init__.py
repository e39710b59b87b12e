"""Hugging Face vision-language model plumbing shared by the attribute generator and the
VLM2Vec embedder: model inputs (processors), LoRA adapters, and tiny offline test models."""
