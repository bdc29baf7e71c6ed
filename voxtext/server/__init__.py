"""HTTP inference server (FastAPI + uvicorn) and its Python client.

``voxtext serve`` keeps models resident behind bounded per-model queues; ``RemoteSegmenter`` and
``RemoteReporter`` in :mod:`voxtext.server.client` use it with the signatures of :class:`voxtext.Segmenter`
and :class:`voxtext.report.Reporter`.
"""
