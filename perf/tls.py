"""A private CA and a loopback certificate made at run time, for the benchmarks' `wss://` provider.

Production's provider is always `wss://`: the benchmarks' peer serves TLS with a certificate
for 127.0.0.1 from a CA made here, and whoever connects to it (switchd, the direct clients, the
asyncio + websockets relay) trusts that CA and nothing is switched off (hostnames verified).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA certificate to trust (PEM)
    chain: Path  # the server's certificate chain, leaf first (PEM)
    key: Path  # the server's private key (PEM)

    def peer_args(self) -> list[str]:
        """perf.engine's flags: its peer serves TLS, its clients trust the CA."""
        return ["--peer-cert", str(self.chain), "--peer-key", str(self.key), "--ca", str(self.ca)]

    def trust_env(self) -> dict[str, str]:
        """switchd's environment to trust the CA: UPSTREAM_CA_FILE (its own setting), and SSL_CERT_FILE,
        which makes Python's default context trust it too (for a switchd that reads only the latter)."""
        return {"UPSTREAM_CA_FILE": str(self.ca), "SSL_CERT_FILE": str(self.ca)}


def make_certs(directory: Path, *hosts: str) -> TlsFiles:
    """A fresh CA and a certificate for `hosts` (default 127.0.0.1 and localhost), written to `directory`."""
    ca = trustme.CA()
    cert = ca.issue_cert(*(hosts or ("127.0.0.1", "localhost")))
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "chain.pem", directory / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    cert.private_key_pem.write_to_path(str(files.key))
    files.chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return files
