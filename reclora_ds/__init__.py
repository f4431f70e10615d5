"""reclora_ds: RecLoRA (lifelong personalized LoRA for LLM-based recommendation) as a toolkit."""

__version__ = "0.1.0"
