"""Qt-free core of the VLMReport module: reports and questions about volumes, stored as MRML text nodes.

Nothing here imports qt, ctk or slicer.app, so it runs (and is tested) on plain MRML from slicer-core.
The background worker and its protocol are TextSeg's (``TextSegLib.job`` / ``TextSegLib.worker``).
"""
