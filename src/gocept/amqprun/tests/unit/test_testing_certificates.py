"""Tests for the test certificates (gocept.amqprun.testing.certificates)."""
import ipaddress
import os
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gocept.amqprun.testing.certificates import Certificates


@pytest.fixture(scope='module')
def certificates(tmp_path_factory):
    return Certificates.create(str(tmp_path_factory.mktemp('tls') / 'new'))


def load(path):
    with open(path, 'rb') as f:
        return x509.load_pem_x509_certificate(f.read())


def test_server_certificate_names_localhost_and_127_0_0_1(certificates):
    server = load(certificates.cert_file)
    names = server.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ['localhost']
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address('127.0.0.1')]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions \
        .get_extension_for_class(x509.ExtendedKeyUsage).value


def test_server_and_client_certificates_are_signed_by_the_ca(certificates):
    ca = load(certificates.ca_file)
    assert ca.extensions.get_extension_for_class(
        x509.BasicConstraints).value.ca
    for path in (certificates.cert_file, certificates.client_cert_file):
        load(path).verify_directly_issued_by(ca)


def test_client_certificate_is_for_client_authentication(certificates):
    client = load(certificates.client_cert_file)
    assert client.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH])


def test_the_other_ca_signed_none_of_them(certificates):
    other = load(certificates.other_ca_file)
    assert other.subject != load(certificates.ca_file).subject
    for path in (certificates.cert_file, certificates.client_cert_file):
        with pytest.raises(ValueError):
            load(path).verify_directly_issued_by(other)


def test_keys_match_their_certificates_and_only_the_owner_reads_them(
        certificates):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.cert_file, certificates.key_file)
    context.load_cert_chain(certificates.client_cert_file,
                            certificates.client_key_file)
    for path in (certificates.key_file, certificates.client_key_file):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_ssl_options_verify_chain_and_host_name(certificates):
    assert certificates.ssl_options() == {
        'ca_certs': certificates.ca_file, 'cert_reqs': ssl.CERT_REQUIRED,
        'server_hostname': 'localhost'}


def test_ssl_options_may_show_the_client_certificate_or_trust_another_ca(
        certificates):
    options = certificates.ssl_options(
        ca_file=certificates.other_ca_file, client_certificate=True,
        server_hostname='other')
    assert options == {
        'ca_certs': certificates.other_ca_file,
        'cert_reqs': ssl.CERT_REQUIRED, 'server_hostname': 'other',
        'certfile': certificates.client_cert_file,
        'keyfile': certificates.client_key_file}
