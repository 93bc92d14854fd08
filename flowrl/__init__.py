"""flowrl: GRPO fine-tuning of flow-matching text-to-image models."""
