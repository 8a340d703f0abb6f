"""Example agents referenced by agents.toml.example."""
