"""config.toml: the schema (frozen dataclasses), parsing with key-named errors, loading."""
