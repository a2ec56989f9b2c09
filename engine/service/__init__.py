"""The use cases of the engine, one module per group; SourceAuth (engine/application.py)
is the facade that integrators import."""
