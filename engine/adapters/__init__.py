"""Adapters: LoRA factors, fine-tune deltas, low-rank algebra, making a donor."""
