"""What the notebooks use around the library: the session (``start``), the scales, figures,
sweeps, explanations, the results report and the ``reproduce`` command."""
from retrieval_lib.book.session import Book, start
