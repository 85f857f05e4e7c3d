"""Serving layer: engine (serving.engine), Ray Serve application, CLI."""
