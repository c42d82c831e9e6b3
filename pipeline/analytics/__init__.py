"""Analytics on stored embeddings, Ray-free: a faiss nearest-neighbour index (``index``: kinds, training,
parts, merging, recall; ``store``: the index folder and the per-file work), batch k-NN search (``search``:
``Searcher``, ``ImageSearcher``), and semantic near-duplicates and clusters (``dedup``). ``vectors`` reads
embeddings files and makes synthetic tables. ``pipeline/ray/analytics.py`` runs the per-file and
per-cluster work as Ray tasks and the search as a Ray Data map."""
