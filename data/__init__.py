"""Data: tokenizer, token shards, corpora (FineWeb-Edu, Shakespeare), HellaSwag.

DataError lives here, with no imports, so that cli.py (and through it plot.py) can catch it without torch.
"""


class DataError(ValueError):
    """A user-facing data problem; scripts print its one-line message and exit with code 2."""
