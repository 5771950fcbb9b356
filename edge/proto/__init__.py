"""Generated gRPC code for protos/edge/proto/edge.proto. Do not edit: regenerate.

    python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. \
        protos/edge/proto/edge.proto
"""
