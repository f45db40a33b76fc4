"""Civitai API v1 source: async client, crawler into the raw landing, local fake server."""
