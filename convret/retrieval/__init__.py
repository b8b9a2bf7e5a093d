"""Retrieval: encode, index, search, evaluate, export, generate."""
