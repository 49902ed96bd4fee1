"""Patched modeling for export (Qwen3 dense: 0.6B/4B/8B)."""
