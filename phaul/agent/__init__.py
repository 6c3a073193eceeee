"""The agent service every host runs (`phaul agent`).

- `server`: the gRPC servicer over mutual TLS: who may call what, the bounds on
  every request, and `serve()`, which runs it with an `AgentConfig`.
- `host`: what an agent knows about its host (name, state directory,
  credentials, container kind, peers and admins, timeouts).
"""
