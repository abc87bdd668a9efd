"""TLS certificates for test brokers, made at test time.

Runs on: any thread; it only writes files. Needs the ``cryptography``
package (part of the ``testing`` extra).

:class:`Certificates` makes a certificate authority, a server certificate
for ``localhost`` (and 127.0.0.1) and a client certificate signed by it,
plus a second, unrelated CA for "wrong CA" tests. Keys are ECDSA P-256:
made in milliseconds, and both Erlang's TLS and Python's accept them.
Nothing is made to last: the certificates are valid for 30 days.
"""
import datetime
import ipaddress
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.oid import NameOID


SERVER_HOSTNAME = 'localhost'
VALIDITY = datetime.timedelta(days=30)


class Certificates:
    """The PEM files of a test CA, its server and client certificates.

    ``ca_file`` (the CA that signed the others), ``cert_file`` and
    ``key_file`` (the server's: ``localhost``, SAN ``DNS:localhost`` and
    ``IP:127.0.0.1``), ``client_cert_file`` and ``client_key_file`` (a
    client certificate signed by the CA) and ``other_ca_file`` (a CA that
    signed nothing of ours) are paths in `directory`. Call
    :meth:`create` to make them.
    """

    def __init__(self, directory):
        self.directory = directory
        self.ca_file = os.path.join(directory, 'ca.pem')
        self.cert_file = os.path.join(directory, 'server.pem')
        self.key_file = os.path.join(directory, 'server.key')
        self.client_cert_file = os.path.join(directory, 'client.pem')
        self.client_key_file = os.path.join(directory, 'client.key')
        self.other_ca_file = os.path.join(directory, 'other-ca.pem')

    @classmethod
    def create(cls, directory):
        """Make fresh keys and certificates in `directory`; return them.

        The directory is created when missing; existing files are
        overwritten.
        """
        os.makedirs(directory, exist_ok=True)
        certificates = cls(directory)
        ca_key, ca = _authority('gocept.amqprun test CA')
        _write_certificate(certificates.ca_file, ca)
        server_key, server = _leaf(
            ca_key, ca, SERVER_HOSTNAME, ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.DNSName(SERVER_HOSTNAME),
             x509.IPAddress(ipaddress.ip_address('127.0.0.1'))])
        _write_certificate(certificates.cert_file, server)
        _write_key(certificates.key_file, server_key)
        client_key, client = _leaf(
            ca_key, ca, 'gocept.amqprun test client',
            ExtendedKeyUsageOID.CLIENT_AUTH)
        _write_certificate(certificates.client_cert_file, client)
        _write_key(certificates.client_key_file, client_key)
        _, other_ca = _authority('gocept.amqprun unrelated CA')
        _write_certificate(certificates.other_ca_file, other_ca)
        return certificates

    def ssl_options(self, ca_file=None, client_certificate=False,
                    server_hostname=SERVER_HOSTNAME):
        """py-amqp's ``ssl`` argument that verifies chain and host name.

        The chain is checked against `ca_file` (default: our CA) and the
        certificate must name `server_hostname`; with
        `client_certificate` the client presents ours. (py-amqp 5 takes
        a dict here: an :class:`ssl.SSLContext` passed as ``ssl`` is
        taken for ``True``, i.e. system CAs and no host name check.)
        """
        options = dict(ca_certs=ca_file or self.ca_file,
                       cert_reqs=ssl.CERT_REQUIRED,
                       server_hostname=server_hostname)
        if client_certificate:
            options.update(certfile=self.client_cert_file,
                           keyfile=self.client_key_file)
        return options


def _authority(common_name):
    """Return (key, certificate) of a new self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    builder = _builder(name, key.public_key(), name, key.public_key())
    builder = builder.add_extension(
        x509.BasicConstraints(ca=True, path_length=0), critical=True)
    builder = builder.add_extension(
        _key_usage(key_cert_sign=True, crl_sign=True), critical=True)
    return key, builder.sign(key, hashes.SHA256())


def _leaf(ca_key, ca, common_name, purpose, alternative_names=None):
    """Return (key, certificate) of a new end entity signed by `ca`."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(_name(common_name), key.public_key(), ca.subject,
                       ca_key.public_key())
    builder = builder.add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True)
    builder = builder.add_extension(
        _key_usage(digital_signature=True), critical=True)
    builder = builder.add_extension(
        x509.ExtendedKeyUsage([purpose]), critical=False)
    if alternative_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(alternative_names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _builder(subject, public_key, issuer, issuer_public_key):
    """A certificate builder with names, keys, serial and validity set.

    Key identifiers on both ends: strict verifiers (Python 3.13's default
    context) insist on them.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = x509.CertificateBuilder(
        issuer_name=issuer, subject_name=subject, public_key=public_key,
        serial_number=x509.random_serial_number(),
        not_valid_before=now - datetime.timedelta(days=1),
        not_valid_after=now + VALIDITY)
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(public_key),
        critical=False)
    return builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_public_key), critical=False)


def _name(common_name):
    """An X.509 name with just `common_name`."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(digital_signature=False, key_cert_sign=False,
               crl_sign=False):
    """A KeyUsage extension with the given bits, all others off."""
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False,
        key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=key_cert_sign, crl_sign=crl_sign,
        encipher_only=False, decipher_only=False)


def _write_certificate(path, certificate):
    """Write `certificate` to `path` as PEM."""
    with open(path, 'wb') as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))


def _write_key(path, key):
    """Write the unencrypted private `key` to `path` (PKCS#8 PEM, 0600)."""
    data = key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'wb') as f:
        f.write(data)
