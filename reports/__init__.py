"""What a run reports: the training records (``summary.csv``, ``curves.png``, TensorBoard, the
optional experiment trackers) and the ``--eval`` reports (JSON, per-class CSV, confusion plots)."""
