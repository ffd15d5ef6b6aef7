"""The composition root: where a node is built from its parts and run (server: storage, the
engine, the HTTP door, the operators' connectors or simulated operators, under one
supervisor) and where `serve --workers N` keeps N such nodes running (workers)."""
