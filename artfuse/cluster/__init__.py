"""Cluster access: connecting to Ray (local or RAY_ADDRESS) and submitting jobs/ entrypoints to a cluster."""

JOBS = ("train", "tune", "label", "evaluate")  # the jobs/ entrypoints `artfuse submit` runs (jobs/<job>.py)
