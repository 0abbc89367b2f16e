"""Training protocol, run configuration, presets and the SQLite results store."""
