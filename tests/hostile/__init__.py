"""A corpus of hostile and broken input (see corpus.py)."""
