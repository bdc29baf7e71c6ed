"""Qt-free core of the TextSeg module: MRML <-> voxtext, the background worker and its protocol.

Nothing here imports qt, ctk or slicer.app, so it runs (and is tested) on plain MRML from slicer-core.
"""
