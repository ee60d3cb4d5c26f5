"""The gRPC side of the coordinator: one port for the workers' data and the operators' control.

- :mod:`.data_plane`: ``sampa.v1.ParameterService``, the round board (points out, gradients in,
  every push validated; non-finite gradients refused at the door)
- :mod:`.control_plane`: ``sampa.v1.CoordinatorService``, status, progress, checkpoint and stop
  answered by the coordinator's handler
- :mod:`.server`: the grpc.aio server hosting both, with health, reflection, token and TLS
- :mod:`.client`: the worker's sync data-plane client and the control-API calls the CLI makes

Nothing is re-exported here, so importing one side (a worker's client) does not pull in the
other (the server's asyncio machinery).
"""
