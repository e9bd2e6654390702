"""What every role shares: the node daemon, the coordinator and the client library.

`nodes/` imports this package and the generated stubs (`edgemesh.v1`), nothing else of `mesh`.
Nothing here imports Ray, zeroconf or a model runtime.

    errors       the one exception hierarchy
    agent_limits agent tasks' step limits: what a node accepts, what escalation asks for
    audit        audit logs as files: appended one JSON line at a time (0600), read back
    attempts     what one attempt at a task did (errors of failed tasks carry them)
    grpc_status  exceptions <-> gRPC status (`google.rpc.Status` with an `ErrorDetail`): one
                 abort helper for servers, one reader for clients
    channels     every gRPC channel and server port (keepalive, limits, transport security)
    bounds       what one request may cost: the limits nodes and the coordinator share
    decoding     requests that do not decode answer INVALID_ARGUMENT (never UNKNOWN)
    ids          distinct id types and their constructors
    model        the frozen base model of every config and record
    records      the mDNS TXT record schema
    untrusted    caller and peer text: quoted short in errors, escaped for a terminal; seeds
    version      the package and protocol versions
"""
