"""retrieval_lib: the library behind the runnable textbook of deep image retrieval.

Notebooks in ``notebooks/`` teach; this package computes. Conventions used everywhere:
feature maps ``(B, C, H, W)``, descriptors ``(N, D)`` L2-normalised, similarity ``Q @ X.T``,
``ranks`` ``(n_queries, n_db)`` database indices best first.
"""

__version__ = "0.1.0"
