"""Retrieval: encode, index, search, evaluate, export, generate (one module per command; see docs/retrieval.md).

Python entry points: :class:`convret.retrieval.encoder.Encoder` and :func:`~convret.retrieval.encoder.embed_sequences`
(embeddings), :mod:`~convret.retrieval.embeddings` (the embedding directory), :func:`~convret.retrieval.index.build_index`,
:func:`~convret.retrieval.search.search_index`, :func:`~convret.retrieval.metrics.evaluate_run`,
:func:`~convret.retrieval.evaluate.evaluate_chain`, :func:`~convret.retrieval.export.export_sentence_transformers`,
:func:`~convret.retrieval.generate.generate_response`. Imported lazily: ``import convret.retrieval`` is cheap.
"""
