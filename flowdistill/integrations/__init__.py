"""Integrations with other libraries (diffusers). Nothing here is imported by the core."""
