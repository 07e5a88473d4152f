"""The ground floor: errors, the registry, config building, files, provenance, devices, the metric
vocabulary and the result of a check. Nothing here imports the rest of the package."""
