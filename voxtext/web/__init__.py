"""VoxText Web: the TextSeg and VLMReport module cores in a browser, on Slicer views (``voxtext web``)."""
