"""OpenAI-compatible API: ``POST /v1/chat/completions`` and ``GET /v1/models``.

The same jobs and workers as ``/medgemma``: only parsing and formatting differ.
"""
