"""The process's runtime: seeding and determinism, provenance, hardware peaks and probes, malloc tuning."""
