"""HTTP inference server (FastAPI + uvicorn) and its Python client.

``voxtext serve`` keeps models resident behind bounded per-model queues; ``RemoteSegmenter`` in
:mod:`voxtext.server.client` segments through it with the signature of :class:`voxtext.Segmenter`.
"""
