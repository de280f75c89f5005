"""Generated gRPC/protobuf stubs for pagemesh's services (see generate.py)."""
