"""Parameters: how to reach the broker nodes and how to behave on them.

Runs on: any thread; ``Parameters`` is a value built once at start-up (from
the ``<amqp-server>`` section or by hand) and read by the I/O thread. Also
public as ``gocept.amqprun.connection.Parameters``. ``Node`` is one broker
node of the ``hostname`` list; ``tls_context`` makes the ``ssl.SSLContext``
of the TLS settings.
"""
import random
import ssl

import gocept.amqprun.interfaces


DEFAULT_PORT = 5672
DEFAULT_TLS_PORT = 5671

#: RabbitMQ 3.x's default ``max_message_size`` (Debian 12 ships 3.10):
#: 128 MiB. RabbitMQ 4.x lowered it to 16 MiB.
DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024 * 1024

#: How long a group commit waits at most for handlers that began within
#: that time: about what a quick handler takes on a busy daemon (measured
#: in bench/README.rst).
DEFAULT_COMMIT_DELAY = 0.001


class Node:
    """One broker node: ``host`` and ``port``; ``str()`` is ``host:port``.
    """

    def __init__(self, host, port):
        self.host = host
        self.port = int(port)

    @property
    def address(self):
        """``host:port`` (IPv6 addresses in brackets)."""
        host = '[%s]' % self.host if ':' in self.host else self.host
        return '%s:%d' % (host, self.port)

    def __str__(self):
        return self.address

    def __repr__(self):
        return '<Node %s>' % self.address

    def __eq__(self, other):
        return (isinstance(other, Node)
                and (self.host, self.port) == (other.host, other.port))

    def __hash__(self):
        return hash((self.host, self.port))


def parse_nodes(hostname, default_port):
    """The :class:`Node` list of a ``hostname`` setting.

    ``hostname`` is one string of ``host`` or ``host:port`` entries
    separated by spaces or commas (``[v6addr]:port`` for IPv6), or a
    list of such entries. Raises ``ValueError`` for an empty list or a
    port that is not a number.
    """
    if isinstance(hostname, str):
        entries = hostname.replace(',', ' ').split()
    else:
        entries = [entry.strip() for entry in hostname]
    nodes = [parse_node(entry, default_port) for entry in entries if entry]
    if not nodes:
        raise ValueError('hostname names no broker node: %r' % (hostname,))
    return nodes


def parse_node(entry, default_port):
    """One ``host[:port]`` entry as a :class:`Node`."""
    if entry.startswith('['):
        host, _, rest = entry[1:].partition(']')
        port = rest[1:] if rest.startswith(':') else default_port
    elif entry.count(':') == 1:
        host, port = entry.split(':')
    else:
        host, port = entry, default_port
    try:
        return Node(host, port or default_port)
    except ValueError:
        raise ValueError('invalid port in broker node %r' % entry) from None


def tls_context(option, ca_file=None, cert_file=None, key_file=None,
                verify=True):
    """The ``ssl.SSLContext`` for the ``ssl`` setting, or None without TLS.

    ``option`` is False, True or a ready ``SSLContext`` (used as it is).
    Verification checks the chain against ``ca_file`` (default: the system
    store) and the host name. Raises ``ConfigurationError`` when a file
    cannot be used.
    """
    if isinstance(option, ssl.SSLContext):
        return option
    if not option:
        return None
    try:
        context = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise gocept.amqprun.interfaces.ConfigurationError(
            'Cannot use the TLS files (ssl_ca_file %s, ssl_cert_file %s, '
            'ssl_key_file %s): %s: %s' % (ca_file, cert_file, key_file,
                                          type(e).__name__, e)) from e
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Parameters:
    """How to reach the broker and how to behave on the connection.

    The keyword names of the original (``hostname``, ``port``,
    ``username``, ``password``, ``virtual_host``, ``heartbeat_interval``)
    plus this project's additions. Unknown keywords are a ``TypeError``;
    an unusable node list or TLS file a ``ValueError`` or
    ``ConfigurationError``.

    ``hostname`` lists one or more broker nodes (see ``parse_nodes()``);
    ``port`` is the port of those that name none (default 5672, 5671 with
    TLS). ``nodes`` is the list in the order they are tried (shuffled once
    with ``shuffle_hosts``). With one node ``hostname`` and ``port`` are
    its host and port, as in the 1.x line; with several, ``hostname`` is
    their ``host:port`` list.

    ``ssl`` is False, True (a context is built from ``ssl_ca_file``,
    ``ssl_cert_file``, ``ssl_key_file`` and ``ssl_verify``) or an
    ``ssl.SSLContext``; ``ssl_server_hostname`` is the name the node
    certificates are checked against (default: the host of each node).
    """

    def __init__(self, hostname='localhost', port=None,
                 username=None, password=None, virtual_host='/',
                 heartbeat_interval=0, connect_timeout=10,
                 prefetch_count=10, ssl=False, startup_attempts=5,
                 reconnect_delay=1.0, reconnect_max_delay=30.0,
                 shuffle_hosts=False, ssl_ca_file=None, ssl_cert_file=None,
                 ssl_key_file=None, ssl_verify=True,
                 ssl_server_hostname=None,
                 max_message_size=DEFAULT_MAX_MESSAGE_SIZE,
                 commit_delay=DEFAULT_COMMIT_DELAY):
        self.ssl = ssl
        self.port = int(port) if port else (
            DEFAULT_TLS_PORT if ssl else DEFAULT_PORT)
        self.nodes = parse_nodes(hostname, self.port)
        self.shuffle_hosts = bool(shuffle_hosts)
        if self.shuffle_hosts:
            random.shuffle(self.nodes)
        if len(self.nodes) == 1:
            self.hostname, self.port = self.nodes[0].host, self.nodes[0].port
        else:
            self.hostname = ','.join(node.address for node in self.nodes)
        self.username = username
        self.password = password
        self.virtual_host = virtual_host or '/'
        self.heartbeat_interval = int(heartbeat_interval or 0)
        self.connect_timeout = float(connect_timeout)
        self.prefetch_count = int(prefetch_count)
        self.startup_attempts = int(startup_attempts)
        self.reconnect_delay = float(reconnect_delay)
        self.reconnect_max_delay = float(reconnect_max_delay)
        self.ssl_ca_file = ssl_ca_file
        self.ssl_cert_file = ssl_cert_file
        self.ssl_key_file = ssl_key_file
        self.ssl_verify = bool(ssl_verify)
        self.ssl_server_hostname = ssl_server_hostname
        #: The ``ssl.SSLContext`` connections use, or None without TLS.
        self.tls_context = tls_context(
            ssl, ssl_ca_file, ssl_cert_file, ssl_key_file, self.ssl_verify)
        #: Largest body in bytes ``send`` accepts; 0: no limit.
        self.max_message_size = int(max_message_size or 0)
        #: Seconds a group commit waits at most for handlers that began
        #: within that time (see ``commits.Gathering``); 0: never.
        self.commit_delay = float(commit_delay or 0)

    @classmethod
    def from_section(cls, section, **overrides):
        """Build parameters from a ZConfig ``<amqp-server>`` section."""
        names = cls.__init__.__code__.co_varnames[
            1:cls.__init__.__code__.co_argcount]
        kw = {name: getattr(section, name) for name in names
              if getattr(section, name, None) is not None}
        kw.update(overrides)
        return cls(**kw)

    @property
    def address(self):
        """``host:port`` of every node (comma separated), for log lines."""
        return ', '.join(node.address for node in self.nodes)

    @property
    def authenticates_broker(self):
        """False when TLS is on but the broker's certificate is not
        verified (encrypted, yet anyone on the path may pose as the
        broker); True otherwise."""
        return (self.tls_context is None
                or self.tls_context.verify_mode != ssl.CERT_NONE)

    def server_hostname(self, node):
        """The name ``node``'s certificate is checked against (and sent as
        SNI)."""
        return self.ssl_server_hostname or node.host

    def __repr__(self):
        return '<Parameters %s://%s@%s/%s>' % (
            'amqps' if self.tls_context else 'amqp',
            self.username or 'guest', self.address,
            self.virtual_host.lstrip('/') or '%2F')
