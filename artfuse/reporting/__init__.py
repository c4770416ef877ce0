"""Metrics (accuracy, macro-F1, confusion) and the plots the jobs write."""
