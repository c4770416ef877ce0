"""The curator's side: a review queue in the browser (app.py, queue.py) and similar works (neighbours.py)."""
