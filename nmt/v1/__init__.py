"""Generated gRPC code of protos/nmt/v1/translator.proto (regenerate with scripts/gen_protos.py).

    from nmt.v1 import translator_pb2, translator_pb2_grpc
"""
