"""The state machines as data (`*.toml`), installed as package data of `sourceauth.specs`."""
