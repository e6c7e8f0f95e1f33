"""The fedllm ClientApp: one per site."""
