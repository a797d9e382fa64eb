"""Ray stages: each feeds the method from a dataset and writes its result to the run directory."""
