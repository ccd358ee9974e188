"""Runtime pieces shared by every service: errors, logging, tracing, the gRPC server factory."""
