"""lorafit: fast, honest LoRA fine-tuning of GPT-2 and other small causal language models."""

__version__ = "0.1.0"
