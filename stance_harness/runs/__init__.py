"""Making and keeping runs: the request, the methods, the one training loop and its instruments,
data-parallel launch, the Run, the run store, residency in memory and saved adapters."""
