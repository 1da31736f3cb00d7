"""KServe V2 gRPC: the .proto source and the stubs generated from it (see inference.proto)."""
