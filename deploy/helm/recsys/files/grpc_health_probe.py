"""grpc.health.v1 check over (mutual) TLS, for the chart's exec probes when `internalTLS` is on.

kubelet's native gRPC probes speak plaintext only (Kubernetes 1.37 adds TLS without a client
certificate), so they cannot reach a server that requires TLS, let alone a client certificate. This
runs inside the pod, dials 127.0.0.1 with the pod's own certificate as the client certificate
(recall and rank require one signed by their client CA), verifies the server against the mounted CA
under the first DNS name of that same certificate (the server presents it, so the name always
matches), and exits 0 only if the service reports SERVING.

Uses the serving image's grpcio and grpcio-health-checking; shipped by the Helm chart in a
ConfigMap. Usage:
  python grpc_health_probe.py --port 50051 --cert tls.crt --key tls.key --ca ca.crt [--service S]
"""

from __future__ import annotations

import argparse
import ssl
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def certificate_name(cert_path: Path) -> str:
    """The first DNS subjectAltName of the (first) certificate in ``cert_path``, else its CN.

    A wildcard (``*.ns.svc``) becomes a name it covers (``probe.ns.svc``)."""
    decoded = ssl._ssl._test_decode_cert(str(cert_path))  # stdlib PEM decoder (no extra package)
    names = [value for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        names = [value for rdn in decoded.get("subject", ()) for key, value in rdn if key == "commonName"]
    if not names:
        raise ValueError(f"{cert_path}: no DNS subjectAltName or commonName")
    name = names[0]
    return "probe" + name[1:] if name.startswith("*.") else name


def check(port: int, service: str, cert: Path, key: Path, ca: Path, timeout: float) -> str:
    """The health status name of ``service`` on 127.0.0.1:``port`` (raises grpc.RpcError)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", certificate_name(cert))]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--service", default="", help='health service name ("" = the whole server)')
    parser.add_argument("--cert", type=Path, required=True, help="client certificate chain (PEM)")
    parser.add_argument("--key", type=Path, required=True, help="its private key (PEM)")
    parser.add_argument("--ca", type=Path, required=True, help="CA that signed the server's certificate")
    parser.add_argument("--timeout", type=float, default=1.5, help="seconds for the RPC")
    args = parser.parse_args(argv)
    try:
        status = check(args.port, args.service, args.cert, args.key, args.ca, args.timeout)
    except grpc.RpcError as error:
        print(f"health check failed: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"health check failed: {error}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
