"""Data sets: public ones (download, preprocessing, cache), a synthetic one, and training samples."""
