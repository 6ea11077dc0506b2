"""Embeddings: model definitions and weights resolution, the inference engine, the vector store (pgvector), and the ``embed`` command."""
