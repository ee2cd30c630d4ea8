"""corex_predict: from a finished run to predictions on new radiographs (work in progress)."""
