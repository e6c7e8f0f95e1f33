"""fedllm: federated fine-tuning of BERT with LoRA adapters and differential privacy."""

__version__ = "0.1.0"
