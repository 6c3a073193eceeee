"""The agent service: the gRPC server and what it knows of its host."""
