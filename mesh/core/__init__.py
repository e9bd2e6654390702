"""What every role shares: the node daemon, the coordinator and the client library.

`nodes/` imports this package and the generated stubs (`edgemesh.v1`), nothing else of `mesh`.
Nothing here imports Ray, zeroconf or a model runtime.

    errors       the one exception hierarchy, and its structured form on the wire
    grpc_status  exceptions <-> gRPC status (with `google.rpc.Status` details), one abort helper
    channels     every gRPC channel and server port (keepalive, limits, transport security)
    ids          distinct id types and their constructors
    model        the frozen base model of every config and record
    records      the mDNS TXT record schema
    version      the package and protocol versions
"""
