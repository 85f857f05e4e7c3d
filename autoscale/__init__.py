"""Prefill and decode pools scaled on their own signals (pure policy + a thin Ray adapter)."""
