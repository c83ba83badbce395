"""The operators behind the public functions: the problem description every backend reads (``problem``),
the backend registry and the ``auto`` rule (``dispatch``), and one folder per operator (``taylor``, ``hybrid``)
with one module per algorithm and per backend adapter."""
