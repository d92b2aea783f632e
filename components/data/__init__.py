"""Data curation: source adapters, checks, dedup, decontamination, templating and packing."""
