"""The TLS of an EC2 run: its own certificate authority, one certificate for its instances, another for the client.

The instances' key is no part of their user-data (which the account's console users, and any
process on an instance through the metadata service, can read): it is kept in a Secrets Manager
secret named after the run, which each instance reads at boot through its instance profile,

    python -m cluster.tls SECRET REGION -- python -m distributed.cli.dask_scheduler ...

and which the run deletes when it ends (`cluster cleanup` too). The client's key never leaves
this machine, and its certificate names it apart from the instances' (CLIENT, INSTANCES).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from distributed.security import Security

SECRET_PREFIX = "fruits-pipeline/"  # the instance profile's role may read secrets under this name only
CLIENT = "fruits-pipeline client"  # the common name of the client's certificate
INSTANCES = "fruits-pipeline instances"  # that of the scheduler's and workers' certificate
VALID = datetime.timedelta(days=7)  # longer than any run; the secret is deleted at its end


@dataclasses.dataclass(frozen=True)
class RunTls:
    """A run's TLS: the client's Security, and what the instances read from the secret (PEM texts)."""

    client: Security
    instances: dict[str, str]  # ca, cert, key

    def secret(self) -> str:
        return json.dumps(self.instances)


def for_run(run_id: str) -> RunTls:
    """A new authority for the run, and the certificates it signs; its own key is dropped once they are signed."""
    authority_key = ec.generate_private_key(ec.SECP256R1())
    authority = certificate(f"fruits-pipeline {run_id}", authority_key.public_key(), None, authority_key)
    instances_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    instances = certificate(INSTANCES, instances_key.public_key(), authority, authority_key,
                            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])  # workers connect too
    client = certificate(CLIENT, client_key.public_key(), authority, authority_key, [ExtendedKeyUsageOID.CLIENT_AUTH])
    ca = pem(authority)
    return RunTls(
        client=Security(tls_ca_file=ca, tls_client_cert=pem(client), tls_client_key=pem(client_key), require_encryption=True),
        instances={"ca": ca, "cert": pem(instances), "key": pem(instances_key)},
    )


def certificate(name: str, public_key, issuer: x509.Certificate | None, issuer_key, usages=None) -> x509.Certificate:
    """An X.509 certificate of `name` signed by `issuer` (None: self-signed, an authority)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.subject if issuer else subject)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALID)
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def pem(item) -> str:
    if isinstance(item, x509.Certificate):
        return item.public_bytes(serialization.Encoding.PEM).decode()
    return item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode()


def secret_name(run_id: str) -> str:
    return f"{SECRET_PREFIX}{run_id}"


def boot_command(secret: str, region: str) -> str:
    """What an instance's container runs before its Dask command: read the TLS secret, then start Dask with it."""
    return f"python -m cluster.tls {secret} {region} --"


def environment(instances: dict[str, str]) -> dict[str, str]:
    """The Dask settings that give a scheduler or worker process the instances' certificate."""
    tls = "DASK_DISTRIBUTED__COMM__TLS__"
    return {f"{tls}CA_FILE": instances["ca"],
            **{f"{tls}{role}__{part.upper()}": instances[part] for role in ("SCHEDULER", "WORKER") for part in ("cert", "key")}}


def main(argv: list[str]) -> None:
    """`python -m cluster.tls SECRET REGION -- COMMAND...`: on an instance, read the run's TLS secret through the
    instance profile and replace this process by COMMAND with it (in its environment, never on disk)."""
    import botocore.session

    secret, region, separator, *command = argv
    if separator != "--" or not command:
        sys.exit("usage: python -m cluster.tls SECRET REGION -- COMMAND...")
    client = botocore.session.get_session().create_client("secretsmanager", region_name=region)
    instances = json.loads(client.get_secret_value(SecretId=secret)["SecretString"])
    os.execvpe(command[0], command, os.environ | environment(instances))


if __name__ == "__main__":
    main(sys.argv[1:])
