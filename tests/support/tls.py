"""A certificate authority, certificates and a Mosquitto with TLS, passwords and an ACL, made here."""

from __future__ import annotations

import datetime as dt
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from .procs import Mosquitto

PASSWORD = "s3cret:pa@ss/word"  # characters that need quoting in a URL
PREFIX = "fgsec"


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server: tuple[Path, Path]
    expired: tuple[Path, Path]
    client: tuple[Path, Path]


def _key_and_cert(folder: Path, name: str, subject: str, issuer: tuple[object, object] | None,
                  days: tuple[int, int] = (-1, 30), ca: bool = False) -> tuple[Path, Path, object, object]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name_ = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_key, issuer_cert = issuer if issuer else (key, None)
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name_)
               .issuer_name(issuer_cert.subject if issuer_cert else name_)  # type: ignore[attr-defined]
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now + dt.timedelta(days=days[0])).not_valid_after(now + dt.timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    cert = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o644)  # mosquitto runs as its own user
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path, key, cert


def shared_subdir(root: Path, name: str) -> Path:
    d = root / f"{name}-{uuid.uuid4().hex[:6]}"
    d.mkdir(mode=0o755)
    return d


def make_pki(folder: Path) -> Pki:
    """A CA, another CA, and server, expired-server and client certificates signed by the first."""
    d = shared_subdir(folder, "pki")
    _, ca, ca_key, ca_cert = _key_and_cert(d, "ca", "framegrid test CA", None, ca=True, days=(-1, 365))
    _, other, _, _ = _key_and_cert(d, "other-ca", "someone else's CA", None, ca=True, days=(-1, 365))
    skey, scert, _, _ = _key_and_cert(d, "server", "127.0.0.1", (ca_key, ca_cert))
    ekey, ecert, _, _ = _key_and_cert(d, "expired", "127.0.0.1", (ca_key, ca_cert), days=(-30, -1))
    ckey, ccert, _, _ = _key_and_cert(d, "client", "framegrid", (ca_key, ca_cert))
    return Pki(ca, other, (scert, skey), (ecert, ekey), (ccert, ckey))


def secure_broker(folder: Path, pki: Pki, cert: tuple[Path, Path]) -> Mosquitto:
    passwd, acl = folder / "passwd", folder / "acl"
    passwd.write_text("")
    for user, word in (("framegrid", PASSWORD), ("watcher", "watch-it")):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, word], check=True, capture_output=True)
    passwd.chmod(0o644)
    acl.write_text(
        f"user framegrid\ntopic write {PREFIX}/#\ntopic read {PREFIX}/talk/+/audio\n\nuser watcher\ntopic read #\n"
    )
    acl.chmod(0o644)
    security = (
        f"cafile {pki.ca}\ncertfile {cert[0]}\nkeyfile {cert[1]}\nrequire_certificate false\n"
        f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n"
    )
    broker = Mosquitto(folder, security=security, scheme="mqtts")
    broker.start()
    return broker
