"""translution-dist: train Translution models at any size."""
