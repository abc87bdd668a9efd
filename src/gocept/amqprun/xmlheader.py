"""The header files of writefiles: zope.xmlpickle's XML format, written and
read without zope.xmlpickle.

Runs on: any thread (writefiles writes header files on a worker, in the
vote of its data manager). Pure functions without shared state.

Upstream stored ``zope.xmlpickle.dumps(properties)`` of pika's
``BasicProperties`` next to each message body. zope.xmlpickle does not
import on Python 3, so this module writes the same XML itself: the same
element names, the same indentation, properties and dict items sorted by
name. Files written by upstream load with :func:`loads`, and files written
by :func:`dumps` load with ``zope.xmlpickle.loads`` on Python 2.

Choices where Python 3 values have no Python 2 counterpart:

* Text (``str``) made of printable ASCII, tab, newline and carriage return
  is written as ``<string>``, any other text as ``<unicode>`` (UTF-8).
  Text with characters XML cannot hold (control characters, lone
  surrogates, U+FFFE, U+FFFF) is written base64-encoded as
  ``<unicode encoding="base64">``, so it round-trips exactly.
* ``bytes`` are written as ``<string>`` when printable as above, otherwise
  as ``<string encoding="base64">``. :func:`loads` returns a plain
  ``<string>`` as ``str`` (a Python 2 ``str`` was text for pika) and a
  base64 ``<string>`` as ``bytes``; so printable ``bytes`` come back as
  ``str``.
* ``True``/``False`` are ``<true/>``/``<false/>``, as zope.xmlpickle wrote
  them (a protocol 1 pickle stores them as ``I01``/``I00``).
* ``int`` is ``<int>``, or ``<long>`` outside the 64-bit range where
  Python 2 switched to ``long``; both load as ``int``.
* ``datetime.datetime``, ``datetime.date`` and ``decimal.Decimal`` (which
  the AMQP client decodes from header tables) have no XML pickle form that
  could be read without importing classes; they are written as text in
  ISO 8601 format (``str()`` for decimals) and load back as ``str``.
* Values are always written in full: shared objects are not turned into
  ``<reference>`` elements. :func:`loads` resolves the ``id`` attributes
  and ``<reference id="..."/>`` elements zope.xmlpickle wrote for them.
"""
import base64
import datetime
import decimal
import os.path
import re
import xml.etree.ElementTree

import gocept.amqprun.message


#: The pickled class named in the header files, as upstream (pika 0.5).
CLASS_MODULE = 'pika.spec'
CLASS_NAME = 'BasicProperties'

#: The attributes of a header file, in the order they are written.
ATTRIBUTE_NAMES = tuple(
    sorted(gocept.amqprun.message.PROPERTY_NAMES + ('headers',)))

#: The first line of a header file, spelt as zope.xmlpickle did.
XML_DECLARATION = '<?xml version="1.0" encoding="utf-8" ?>'

# Dict keys written as ``<item key="...">``; zope.xmlpickle's rule (at
# least two characters). Used with fullmatch: ``$`` would accept a
# trailing newline, which an attribute value cannot keep.
_IDENTIFIER = re.compile('[_a-zA-Z][_a-zA-Z0-9]{1,40}')
# Text that may go into a ``<string>`` element.
_PRINTABLE_ASCII = re.compile('[\t\n\r -~]*')
# Characters XML 1.0 cannot hold, not even as character references.
_INVALID_XML_CHAR = re.compile(
    '[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]')
# Python 2 pickled larger ints as ``long``.
_INT_RANGE = range(-2 ** 63, 2 ** 63)
_TEXT_TYPES = (datetime.datetime, datetime.date, decimal.Decimal)
_INDENT = 2
# zope.xmlpickle indents the value of an ``<item key="...">`` by four.
_SHORT_ITEM_INDENT = 4


# Writing

def dumps(header):
    """Return the header file for ``header`` (a message Header) as bytes.

    Raises :class:`TypeError` for a value of a type listed neither in the
    module docstring nor as dict, list or tuple.
    """
    attributes = [(name, getattr(header, name)) for name in ATTRIBUTE_NAMES]
    lines = [XML_DECLARATION, '<pickle>']
    lines.extend(_object_lines(attributes, _INDENT))
    lines.append('</pickle>')
    return ('\n'.join(lines) + '\n').encode('utf-8')


def _object_lines(attributes, indent):
    """Return the ``<classic_object>`` element with its class and state."""
    pad = ' ' * indent
    inner = ' ' * (indent + _INDENT)
    klass = ' ' * (indent + 2 * _INDENT)
    return [
        pad + '<classic_object>',
        inner + '<klass>',
        klass + '<global name="%s" module="%s"/>' % (CLASS_NAME, CLASS_MODULE),
        inner + '</klass>',
        *_items_lines(
            'attributes', 'attribute', 'name', attributes, indent + _INDENT),
        pad + '</classic_object>',
    ]


def _value_lines(value, indent):
    """Return the lines of the element for ``value``."""
    scalar = _scalar_xml(value)
    if scalar is not None:
        return [' ' * indent + scalar]
    if isinstance(value, dict):
        items = sorted(value.items(), key=_item_sort_key)
        return _items_lines('dictionary', 'item', 'key', items, indent)
    if isinstance(value, (list, tuple)):
        return _sequence_lines(value, indent)
    raise TypeError('Cannot write a %s to a header file: %r' % (
        type(value).__name__, value))


def _item_sort_key(item):
    """Sort dict items by key; keys of different types by type name."""
    key = item[0]
    return (type(key).__name__, key)


def _sequence_lines(value, indent):
    """Return the lines of a ``<list>`` or ``<tuple>`` element."""
    name = 'tuple' if isinstance(value, tuple) else 'list'
    pad = ' ' * indent
    if not value:
        return ['%s<%s />' % (pad, name)]
    lines = [pad + '<%s>' % name]
    for element in value:
        lines.extend(_value_lines(element, indent + _INDENT))
    lines.append(pad + '</%s>' % name)
    return lines


def _items_lines(name, item_name, key_name, items, indent):
    """Return the lines of a ``<dictionary>`` or ``<attributes>`` element.

    ``items`` are (key, value) pairs in the order to write.
    """
    pad = ' ' * indent
    if not items:
        return ['%s<%s />' % (pad, name)]
    lines = [pad + '<%s>' % name]
    for key, value in items:
        lines.extend(_item_lines(
            item_name, key_name, key, value, indent + _INDENT))
    lines.append(pad + '</%s>' % name)
    return lines


def _item_lines(item_name, key_name, key, value, indent):
    """Return one item: ``<item key="k">`` or ``<item><key>..<value>..``."""
    pad = ' ' * indent
    if isinstance(key, str) and _IDENTIFIER.fullmatch(key):
        return [
            '%s<%s %s="%s">' % (pad, item_name, key_name, key),
            *_value_lines(value, indent + _SHORT_ITEM_INDENT),
            '%s</%s>' % (pad, item_name),
        ]
    return [
        '%s<%s>' % (pad, item_name),
        *_wrapper_lines('key', key, indent + _INDENT),
        *_wrapper_lines('value', value, indent + _INDENT),
        '%s</%s>' % (pad, item_name),
    ]


def _wrapper_lines(name, value, indent):
    """Return ``value`` wrapped in a ``<key>`` or ``<value>`` element.

    Scalars stay on the line of the wrapper, as zope.xmlpickle writes them.
    """
    pad = ' ' * indent
    scalar = _scalar_xml(value)
    if scalar is not None:
        return ['%s<%s> %s </%s>' % (pad, name, scalar, name)]
    return [
        '%s<%s>' % (pad, name),
        *_value_lines(value, indent + _INDENT),
        '%s</%s>' % (pad, name),
    ]


def _scalar_xml(value):
    """Return the element for a scalar ``value``, None for containers."""
    if value is None:
        return '<none/>'
    if isinstance(value, bool):
        return '<true/>' if value else '<false/>'
    if isinstance(value, int):
        name = 'int' if value in _INT_RANGE else 'long'
        return '<%s>%d</%s>' % (name, value, name)
    if isinstance(value, float):
        return '<float>%r</float>' % value
    if isinstance(value, _TEXT_TYPES):
        value = _as_text(value)
    if isinstance(value, str):
        return _text_xml(value)
    if isinstance(value, (bytes, bytearray)):
        return _bytes_xml(bytes(value))
    return None


def _as_text(value):
    """Return a date, datetime or decimal as text (ISO 8601 for dates)."""
    if isinstance(value, decimal.Decimal):
        return str(value)
    return value.isoformat()


def _text_xml(text):
    """Return ``<string>`` or ``<unicode>`` for ``text`` (a str)."""
    if _INVALID_XML_CHAR.search(text):
        encoded = _base64(text.encode('utf-8', 'surrogatepass'))
        return '<unicode encoding="base64">%s</unicode>' % encoded
    name = 'string' if _PRINTABLE_ASCII.fullmatch(text) else 'unicode'
    return '<%s>%s</%s>' % (name, _quote(text), name)


def _bytes_xml(data):
    """Return ``<string>`` for ``data``, base64-encoded unless printable."""
    text = data.decode('latin-1')
    if _PRINTABLE_ASCII.fullmatch(text):
        return '<string>%s</string>' % _quote(text)
    return '<string encoding="base64">%s</string>' % _base64(data)


def _base64(data):
    """Return ``data`` in base64 as zope.xmlpickle: lines of 76 characters.
    """
    return base64.encodebytes(data).decode('ascii')[:-1]


def _quote(text):
    """Return ``text`` as XML character data that reads back unchanged.

    A carriage return would be normalised to a newline inside CDATA, so
    text containing one is escaped; other text with markup characters goes
    into CDATA like upstream's, split where it contains ``]]>``.
    """
    if '\r' in text:
        return (text.replace('&', '&amp;').replace('<', '&lt;')
                .replace('>', '&gt;').replace('\r', '&#x0d;'))
    if '<' in text or '&' in text or ']]>' in text:
        return '<![CDATA[%s]]>' % text.replace(']]>', ']]]]><![CDATA[>')
    return text


# Reading

def loads(data):
    """Return the :class:`gocept.amqprun.message.Header` of a header file.

    ``data`` is the file's content, bytes or str. Attributes missing from
    the file are None. Raises :class:`ValueError` naming the problem if
    ``data`` is not well-formed XML or not in this format. Entities are not
    expanded: a document type declaration is rejected.
    """
    root = _parse(data)
    attributes = _read_object(root)
    headers = attributes.pop('headers', None)
    if headers is not None and not isinstance(headers, dict):
        raise ValueError(
            'Header file attribute "headers" is not a dictionary: %r'
            % (headers,))
    return gocept.amqprun.message.Header(headers=headers, **attributes)


class _TreeBuilder(xml.etree.ElementTree.TreeBuilder):
    """A tree builder that refuses document type declarations."""

    def doctype(self, name, pubid, system):
        """Refuse the declaration before its entities can be used."""
        raise ValueError(
            'Header file has a document type declaration (%s)' % name)


def _parse(data):
    """Return the root element of ``data``, raising ValueError if broken."""
    parser = xml.etree.ElementTree.XMLParser(target=_TreeBuilder())
    try:
        parser.feed(data)
        return parser.close()
    except xml.etree.ElementTree.ParseError as error:
        raise ValueError(
            'Header file is not well-formed XML: %s' % error) from error


def _read_object(root):
    """Return the attributes of the pickled object as a dict."""
    _expect(root, 'pickle')
    (instance,) = _children(root, 1)
    # A new-style class pickles as <object>, with the same children.
    _expect(instance, 'classic_object', 'object')
    klass, attributes = _children(instance, 2)
    _expect(klass, 'klass')
    (global_,) = _children(klass, 1)
    _expect(global_, 'global')
    _expect(attributes, 'attributes')
    return _Reader().attributes(attributes)


def _expect(element, *tags):
    """Raise ValueError unless ``element`` has one of the ``tags``."""
    if element.tag not in tags:
        raise ValueError('Header file has <%s> where <%s> belongs' % (
            element.tag, '> or <'.join(tags)))


def _children(element, count=None):
    """Return the child elements, making sure there is no text between.

    With ``count``, raise ValueError unless there are that many.
    """
    children = list(element)
    texts = [element.text] + [child.tail for child in children]
    if any(text and text.strip() for text in texts):
        raise ValueError('Header file has text in <%s>' % element.tag)
    if count is not None and len(children) != count:
        raise ValueError('Header file has %d elements in <%s>, not %d' % (
            len(children), element.tag, count))
    return children


def _leaf(element):
    """Return the text of ``element``, making sure it has no children."""
    if len(element):
        raise ValueError('Header file has elements in <%s>' % element.tag)
    return element.text or ''


class _Reader:
    """Decodes the value elements of one header file.

    Remembers values that carry an ``id`` for ``<reference>`` elements.
    """

    def __init__(self):
        self.values_by_id = {}

    def attributes(self, element):
        """Return the ``<attribute>`` children of ``element`` as a dict."""
        result = {}
        for child in _children(element):
            _expect(child, 'attribute')
            name = child.get('name')
            if name not in ATTRIBUTE_NAMES:
                raise ValueError(
                    'Header file has an unknown attribute %r' % name)
            if name in result:
                raise ValueError(
                    'Header file has attribute %r twice' % name)
            result[name] = self.wrapped(child)
        return result

    def wrapped(self, element):
        """Return the value of the single child of ``element``."""
        (child,) = _children(element, 1)
        return self.value(child)

    def value(self, element):
        """Return the value ``element`` stands for."""
        if element.tag == 'reference':
            return self.reference(element)
        decode = self.DECODERS.get(element.tag)
        if decode is None:
            raise ValueError(
                'Header file has an unknown element <%s>' % element.tag)
        value = decode(self, element)
        if element.get('id'):
            self.values_by_id[element.get('id')] = value
        return value

    def reference(self, element):
        """Return the value an earlier element gave the same ``id``."""
        _children(element, 0)
        try:
            return self.values_by_id[element.get('id')]
        except KeyError:
            raise ValueError('Header file refers to an unknown id %r' % (
                element.get('id'),)) from None

    def constant(self, element):
        """Return the value of ``<none/>``, ``<true/>`` or ``<false/>``."""
        _children(element, 0)
        return {'none': None, 'true': True, 'false': False}[element.tag]

    def number(self, element):
        """Return the value of ``<int>``, ``<long>`` or ``<float>``."""
        text = _leaf(element).strip()
        try:
            if element.tag == 'float':
                return float(text)
            # Python 2 wrote longs with a trailing L in some versions.
            return int(text[:-1] if text[-1:] in 'lL' else text)
        except ValueError:
            raise ValueError('Header file has a bad <%s>: %r' % (
                element.tag, text)) from None

    def text(self, element):
        """Return the value of ``<string>`` or ``<unicode>``.

        A base64 ``<string>`` is bytes, everything else str.
        """
        text = _leaf(element)
        encoding = element.get('encoding')
        if not encoding:
            return text
        if encoding != 'base64':
            raise ValueError('Header file has <%s> in unknown encoding %r' % (
                element.tag, encoding))
        data = _unbase64(text)
        if element.tag == 'string':
            return data
        return data.decode('utf-8', 'surrogatepass')

    def dictionary(self, element):
        """Return the ``<item>`` children of ``element`` as a dict."""
        result = {}
        for item in _children(element):
            _expect(item, 'item')
            key, value = self.item(item)
            result[key] = value
        return result

    def item(self, element):
        """Return (key, value) of ``<item key="">`` or ``<item><key>..``."""
        if element.get('key') is not None:
            return element.get('key'), self.wrapped(element)
        key, value = _children(element, 2)
        _expect(key, 'key')
        _expect(value, 'value')
        return self.wrapped(key), self.wrapped(value)

    def sequence(self, element):
        """Return the value of ``<list>`` or ``<tuple>``."""
        values = [self.value(child) for child in _children(element)]
        return tuple(values) if element.tag == 'tuple' else values

    DECODERS = {
        'none': constant,
        'true': constant,
        'false': constant,
        'int': number,
        'long': number,
        'float': number,
        'string': text,
        'unicode': text,
        'dictionary': dictionary,
        'list': sequence,
        'tuple': sequence,
    }


def _unbase64(text):
    """Return the bytes of base64 ``text``, raising ValueError if broken."""
    try:
        return base64.b64decode(''.join(text.split()), validate=True)
    except ValueError as error:
        raise ValueError(
            'Header file has broken base64: %s' % error) from error


# File names

def header_filename(filename):
    """Return the name of the header file for the body file ``filename``.

    ``.header`` goes before the extension: ``foo.xml`` becomes
    ``foo.header.xml``, ``foo`` becomes ``foo.header``.
    """
    base, extension = os.path.splitext(filename)
    return '%s.header%s' % (base, extension)


def is_header_file(filename):
    """Return whether ``filename`` is a name made by :func:`header_filename`.

    Unlike upstream this is also true for extension-less header files
    (``foo.header``).
    """
    base, extension = os.path.splitext(filename)
    return base.endswith('.header') or extension == '.header'
