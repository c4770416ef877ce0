"""Measurement tools behind `artfuse bench`: each times the parts of a job alone and the whole in one run."""
