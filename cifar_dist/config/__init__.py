"""Configuration: the typed schema, loading and validation, key=value overrides, the reference, user objects."""
