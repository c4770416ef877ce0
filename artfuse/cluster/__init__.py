"""Cluster access: connecting to Ray (local or RAY_ADDRESS) and submitting jobs/ entrypoints to a cluster."""
