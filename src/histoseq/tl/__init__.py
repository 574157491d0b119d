"""Tools: embeddings, expression models and their evaluation (coming with the next issues)."""

__all__: list[str] = []
