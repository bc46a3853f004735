"""One way to wrap a grpc method handler's behaviour, for every interceptor of the server.

A handler comes in four kinds (unary or streaming request and response); an interceptor that wraps
the behaviour must hand back a handler of the same kind with the same (de)serializers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def behaviour(handler: Any) -> Callable:
    """The function the handler runs: (request or request iterator, context) -> response(s)."""
    return getattr(handler, _KINDS[(handler.request_streaming, handler.response_streaming)][0])


def rewrap(handler: Any, new_behaviour: Callable) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind and serializers that runs `new_behaviour` instead."""
    make = _KINDS[(handler.request_streaming, handler.response_streaming)][1]
    return make(new_behaviour, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
