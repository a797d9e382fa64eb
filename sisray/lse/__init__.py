"""The method (LSE, docs/METHOD.md steps 1-5) as pure functions: tensors and small records in and out.

No Ray, no MLflow, no file I/O here. Per-image functions (entropy, records, patches) are what a Ray
actor calls; driver-side functions (selection, thresholds) work on the table of per-image records.
"""
