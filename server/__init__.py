"""The fedllm ServerApp: FedAvg over LoRA adapters."""
