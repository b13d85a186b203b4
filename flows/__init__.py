"""Example flows: copy them, or run them as scripts (``python flows/generate_and_store.py``)."""
