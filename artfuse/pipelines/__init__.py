"""Jobs as functions: train, tune, label, evaluate, ablate, bench, demo. The CLI and jobs/ entrypoints call them."""
