"""Data in: URIs and storage, collections and inputs, the one image decoder, Ray Data stages, sample data."""
