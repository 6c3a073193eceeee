"""Talking to other hosts: the gRPC client, protobuf conversions, TLS data channels, rsync, the PKI."""
