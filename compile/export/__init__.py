"""Checkpoint loading and export-friendly modeling of Qwen3-Next."""
