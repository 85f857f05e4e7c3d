"""Locust load tests against the OpenAI-compatible endpoint."""
