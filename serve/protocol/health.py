"""`nmt health --server HOST:PORT`: exit 0 only when the server answers SERVING (compose/k8s probes).

Prints the status (SERVING, NOT_SERVING, ...) or one line saying why there was no answer.
Exit codes: 0 SERVING, 1 any other status, 2 no answer (unreachable, timeout, TLS failure).
"""

from __future__ import annotations

import argparse

from serve.protocol.client import TranslatorClient, add_connection_flags
from serve.protocol.errors import TranslatorError


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nmt health", description=__doc__.splitlines()[0])
    add_connection_flags(p)
    p.add_argument("--service", default="", help="health service name (default: the whole server)")
    p.set_defaults(timeout=3.0)
    args = p.parse_args(argv)
    try:
        with TranslatorClient(args.server, tls_ca=args.tls_ca) as client:
            status = client.health(args.service, timeout=args.timeout)
    except TranslatorError as e:
        raise e.user_error(args.server) from None
    print(status)
    return 0 if status == "SERVING" else 1
