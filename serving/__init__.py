"""Serving a bundle: the vLLM supervisor, the RAG gateway and the chat UI. Imports only the shared core."""
