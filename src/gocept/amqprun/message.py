"""Message: one incoming or outgoing AMQP message, a plain value.

Runs on: any thread. Built by the I/O thread for deliveries and by handlers
for the messages they send; it never touches a channel.
"""
import datetime
import email.utils
import itertools
import os
import socket
import string
import threading
import time

import zope.interface

import gocept.amqprun.interfaces


#: The AMQP 0-9-1 basic properties, in wire order (without the
#: application headers, which are kept apart).
PROPERTY_NAMES = (
    'content_type', 'content_encoding', 'delivery_mode', 'priority',
    'correlation_id', 'reply_to', 'expiration', 'message_id', 'timestamp',
    'type', 'user_id', 'app_id', 'cluster_id')

_PROPERTY_SET = frozenset(PROPERTY_NAMES)
_HEADER_KEYS = ('headers', 'application_headers')

_FQDN = None


def make_message_id():
    """Return a fresh email-like message id ``<digits.gocept.amqprun@host>``.
    """
    global _FQDN
    if _FQDN is None:
        # getfqdn() may take a DNS round trip: do it once per process.
        _FQDN = socket.getfqdn()
    return email.utils.make_msgid('gocept.amqprun', domain=_FQDN)


class Header:
    """The properties of a message as attributes.

    ``headers`` holds the application headers (a dict); it is also
    reachable as ``application_headers``.
    """

    def __init__(self, headers=None, **properties):
        unknown = [name for name in properties if name not in _PROPERTY_SET]
        if unknown:
            raise TypeError(
                'Unknown message properties: %s' % ', '.join(unknown))
        for name in PROPERTY_NAMES:
            setattr(self, name, properties.get(name))
        self.headers = headers

    @property
    def application_headers(self):
        return self.headers

    @application_headers.setter
    def application_headers(self, value):
        self.headers = value

    def properties(self):
        """Return the set properties as the dict the AMQP client expects."""
        result = {name: getattr(self, name) for name in PROPERTY_NAMES
                  if getattr(self, name) is not None}
        if self.timestamp is not None:
            result['timestamp'] = int(self.timestamp)
        if self.headers:
            result['application_headers'] = dict(self.headers)
        return result

    def __eq__(self, other):
        if not isinstance(other, Header):
            return NotImplemented
        return vars(self) == vars(other)

    def __repr__(self):
        items = ', '.join('%s=%r' % item for item in sorted(vars(self).items())
                          if item[1] is not None)
        return '<Header %s>' % items


def convert_header(header_dict):
    """Return a :class:`Header` for an outgoing message.

    Property names become attributes, every other key an application header
    (a ``headers`` key is merged into them). Defaults: a fresh message id,
    ``delivery_mode`` 2 (persistent) and the current time; given values win.
    """
    properties = {}
    extra = {}
    for name, value in header_dict.items():
        if name in _PROPERTY_SET:
            properties[name] = value
        elif name not in _HEADER_KEYS:
            extra[name] = value
    if 'message_id' not in properties:
        properties['message_id'] = make_message_id()
    if 'delivery_mode' not in properties:
        properties['delivery_mode'] = 2
    if 'timestamp' not in properties:
        properties['timestamp'] = int(time.time())
    headers = dict(header_dict.get('headers') or {})
    headers.update(header_dict.get('application_headers') or {})
    headers.update(extra)
    return Header(headers=headers, **properties)


def header_from_properties(properties):
    """Return a :class:`Header` for the properties dict of a delivery."""
    known = {name: value for name, value in properties.items()
             if name in _PROPERTY_SET}
    return Header(headers=properties.get('application_headers'), **known)


_unique_counter = itertools.count()
_unique_lock = threading.Lock()


def unique_token():
    """Return a token unique among all threads and processes of this host.

    Seconds with six decimals (sortable, as upstream), the process id and a
    per-process counter.
    """
    with _unique_lock:
        count = next(_unique_counter)
    return '%f-%d-%d' % (time.time(), os.getpid(), count)


def redelivery_key(message):
    """What names a received message across redeliveries: its message id,
    or (without one) a hash of routing key and body."""
    return message.header.message_id or hash(
        (message.routing_key, message.body))


def describe_publish(message):
    """``message <id> to exchange 'x' with routing key 'k'`` for errors."""
    return 'message %s to exchange %r with routing key %r' % (
        message.header.message_id, message.exchange,
        message.routing_key or '')


def check_size(message, limit):
    """Raise ``PublishRefused`` when the body of ``message`` is larger
    than ``limit`` bytes (0: no limit), as the broker would."""
    size = len(message.body or b'')
    if limit and size > limit:
        raise gocept.amqprun.interfaces.PublishRefused(
            'Cannot publish %s: its body is %d bytes, above '
            'max_message_size %d' % (describe_publish(message), size, limit))


@zope.interface.implementer(gocept.amqprun.interfaces.IMessage)
class Message:
    """A message to send, or one received from the broker."""

    exchange = 'amq.topic'

    def __init__(self, header, body, delivery_tag=None, routing_key=None,
                 redelivered=False, exchange=None):
        if not isinstance(header, Header):
            header = convert_header(header or {})
        if body is not None and not isinstance(body, (bytes, str)):
            raise ValueError(
                'Message body must be bytes or str, not %s' % type(body))
        if isinstance(body, str):
            if header.content_encoding is None:
                header.content_encoding = 'utf-8'
            body = body.encode(header.content_encoding)
        self.header = header
        self.body = body
        self.delivery_tag = delivery_tag
        self.routing_key = routing_key or None
        self.redelivered = redelivered
        if exchange is not None:
            self.exchange = exchange
        #: Set by the server on received messages: where it came from
        #: (opaque to everyone but the I/O thread).
        self.delivery = None
        #: Set by the worker handling a received message.
        self._session = None

    def __repr__(self):
        return '<Message %s routing_key=%r tag=%s>' % (
            self.header.message_id, self.routing_key, self.delivery_tag)

    def generate_filename(self, pattern):
        """Substitute the writefiles pattern variables (see IMessage)."""
        timestamp = self.header.timestamp
        date = (datetime.datetime.fromtimestamp(timestamp)
                if timestamp is not None else datetime.datetime.now())
        headers = self.header.headers or {}
        variables = dict(
            date=date.strftime('%Y-%m-%d'),
            msgid=self.header.message_id or '',
            routing_key=self.routing_key or '',
            unique=unique_token(),
            xfilename=headers.get('X-Filename') or '',
        )
        return string.Template(pattern).substitute(variables)

    def reference(self, message):
        """Point this message at its parent ``message`` (see IMessage)."""
        if not gocept.amqprun.interfaces.IMessage.providedBy(message):
            return
        parent_id = message.header.message_id
        if not parent_id:
            return
        if not self.header.correlation_id:
            self.header.correlation_id = parent_id
        if self.header.headers is None:
            self.header.headers = {}
        if 'references' in self.header.headers:
            return
        parent_references = (message.header.headers or {}).get('references')
        if parent_references:
            references = '%s\n%s' % (parent_references, parent_id)
        else:
            references = parent_id
        self.header.headers['references'] = references

    def acknowledge(self):
        """Ack this message with the commit of the current transaction."""
        if self._session is None:
            raise RuntimeError('No channel set for acknowledge.')
        self._session.acknowledge(self)
