"""The ``translution`` command: everything before the first training process starts."""
