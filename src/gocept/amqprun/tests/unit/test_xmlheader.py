"""Tests for gocept.amqprun.xmlheader, the header files of writefiles."""
import datetime
import decimal

import pytest

from gocept.amqprun.message import Header
from gocept.amqprun.message import convert_header
from gocept.amqprun.xmlheader import dumps
from gocept.amqprun.xmlheader import header_filename
from gocept.amqprun.xmlheader import is_header_file
from gocept.amqprun.xmlheader import loads


#: The upstream sample (zope.xmlpickle 3.4.0, pika 0.5.2) from the
#: reference, with the elided attributes filled in. (Its message id line
#: is longer than 79 characters, as upstream wrote it.)
UPSTREAM_SAMPLE = '''\
<?xml version="1.0" encoding="utf-8" ?>
<pickle>
  <classic_object>
    <klass>
      <global name="BasicProperties" module="pika.spec"/>
    </klass>
    <attributes>
      <attribute name="app_id">
          <none/>
      </attribute>
      <attribute name="cluster_id">
          <none/>
      </attribute>
      <attribute name="content_encoding">
          <none/>
      </attribute>
      <attribute name="content_type">
          <string>text/xml</string>
      </attribute>
      <attribute name="correlation_id">
          <none/>
      </attribute>
      <attribute name="delivery_mode">
          <int>2</int>
      </attribute>
      <attribute name="expiration">
          <none/>
      </attribute>
      <attribute name="headers">
          <dictionary>
            <item>
              <key> <string>X-Filename</string> </key>
              <value> <string>foo.xml</string> </value>
            </item>
            <item key="references">
                <string>a
b</string>
            </item>
          </dictionary>
      </attribute>
      <attribute name="message_id">
          <string><![CDATA[<20110714121500.123.456.gocept.amqprun@host>]]></string>
      </attribute>
      <attribute name="priority">
          <none/>
      </attribute>
      <attribute name="reply_to">
          <none/>
      </attribute>
      <attribute name="timestamp">
          <float>1310645700.25</float>
      </attribute>
      <attribute name="type">
          <none/>
      </attribute>
      <attribute name="user_id">
          <none/>
      </attribute>
    </attributes>
  </classic_object>
</pickle>
'''  # noqa: E501

SAMPLE_HEADER = Header(
    content_type='text/xml',
    delivery_mode=2,
    headers={'X-Filename': 'foo.xml', 'references': 'a\nb'},
    message_id='<20110714121500.123.456.gocept.amqprun@host>',
    timestamp=1310645700.25,
)

TRICKY_TEXTS = [
    '',
    ' ',
    '  leading and trailing  ',
    'a < b',
    'fish & chips',
    ']]>',
    'a]]>b',
    '<![CDATA[x]]>',
    'x]]]]>y',
    'one\ntwo\n',
    'one\r\ntwo',
    '\r',
    'cr \r and ]]> and < and &',
    'tab\there',
    'caf\u00e9',
    '\u65e5\u672c\u8a9e',
    '\U0001f600 emoji',
    'control \x01\x02\x1b\x1f chars',
    'vertical \x0b and form feed \x0c',
    'NUL \x00 too',
    'delete \x7f',
    'lone surrogate \ud800',
    'not a character \ufffe\uffff',
    '&amp; &lt; &#x0d; literal',
]


def document(attributes):
    """Return a header file with the given ``<attribute>`` elements."""
    return (
        '<?xml version="1.0" encoding="utf-8" ?>\n'
        '<pickle><classic_object>'
        '<klass><global name="BasicProperties" module="pika.spec"/></klass>'
        '<attributes>%s</attributes>'
        '</classic_object></pickle>\n' % attributes).encode('utf-8')


def headers_document(value_xml):
    """Return a header file whose ``headers`` attribute is ``value_xml``."""
    return document('<attribute name="headers">%s</attribute>' % value_xml)


def round_trip(header):
    """Return ``header`` written and read back."""
    return loads(dumps(header))


def round_trip_value(value):
    """Return ``value`` stored as an application header and read back."""
    return round_trip(Header(headers={'value': value})).headers['value']


# The upstream sample

def test_loads_reads_the_upstream_sample():
    assert loads(UPSTREAM_SAMPLE.encode('utf-8')) == SAMPLE_HEADER


def test_loads_reads_a_str_document():
    assert loads(UPSTREAM_SAMPLE) == SAMPLE_HEADER


def test_loads_leaves_attributes_missing_from_the_file_none():
    header = loads(document(
        '<attribute name="message_id"><string>id</string></attribute>'))
    assert header == Header(message_id='id')
    assert header.headers is None


def test_dumps_writes_the_upstream_sample_exactly():
    assert dumps(SAMPLE_HEADER) == UPSTREAM_SAMPLE.encode('utf-8')


def test_dumps_writes_an_empty_header_exactly():
    attributes = ''.join(
        '      <attribute name="%s">\n'
        '          <none/>\n'
        '      </attribute>\n' % name for name in [
            'app_id', 'cluster_id', 'content_encoding', 'content_type',
            'correlation_id', 'delivery_mode', 'expiration', 'headers',
            'message_id', 'priority', 'reply_to', 'timestamp', 'type',
            'user_id'])
    assert dumps(Header()).decode('utf-8') == (
        '<?xml version="1.0" encoding="utf-8" ?>\n'
        '<pickle>\n'
        '  <classic_object>\n'
        '    <klass>\n'
        '      <global name="BasicProperties" module="pika.spec"/>\n'
        '    </klass>\n'
        '    <attributes>\n'
        + attributes +
        '    </attributes>\n'
        '  </classic_object>\n'
        '</pickle>\n')


# Writing

def test_dumps_returns_utf8_bytes():
    data = dumps(Header(type='caf\u00e9'))
    assert isinstance(data, bytes)
    assert '<unicode>caf\u00e9</unicode>'.encode('utf-8') in data


def test_dumps_sorts_attributes_by_name():
    data = dumps(Header(app_id='a', user_id='u', content_type='c'))
    names = [line.split('"')[1] for line in data.decode().splitlines()
             if '<attribute name=' in line]
    assert names == sorted(names)
    assert names[0] == 'app_id'
    assert names[-1] == 'user_id'
    assert len(names) == 14


def test_dumps_sorts_dictionary_items_by_key():
    data = dumps(Header(headers={'b': 1, 'B': 2, 'ab': 3, 'a': 4}))
    text = data.decode()
    positions = [text.index(marker) for marker in [
        '<string>B</string>', '<string>a</string>', 'key="ab"',
        '<string>b</string>']]
    assert positions == sorted(positions)


def test_dumps_uses_the_short_item_form_for_identifier_like_keys():
    text = dumps(Header(headers={'_x': 1, 'ab': 2, 'a' * 41: 3})).decode()
    assert '<item key="_x">' in text
    assert '<item key="ab">' in text
    assert '<item key="%s">' % ('a' * 41) in text


@pytest.mark.parametrize('key', [
    'a', 'a-b', '1ab', 'a' * 42, 'ab\n', 'caf\u00e9', b'ab'])
def test_dumps_uses_key_and_value_elements_for_other_keys(key):
    text = dumps(Header(headers={key: 1})).decode()
    assert '<item key=' not in text
    assert '<key> ' in text
    assert '<value> <int>1</int> </value>' in text


def test_dumps_writes_cdata_for_markup_characters():
    text = dumps(Header(type='a<b&c')).decode()
    assert '<string><![CDATA[a<b&c]]></string>' in text


def test_dumps_splits_cdata_around_its_end_marker():
    text = dumps(Header(type='<]]>')).decode()
    assert '<string><![CDATA[<]]]]><![CDATA[>]]></string>' in text


def test_dumps_escapes_text_with_carriage_returns():
    text = dumps(Header(type='a\r<]]>&')).decode()
    assert '<string>a&#x0d;&lt;]]&gt;&amp;</string>' in text


def test_dumps_writes_printable_ascii_text_as_string():
    text = dumps(Header(type='plain text\twith tab')).decode()
    assert '<string>plain text\twith tab</string>' in text


def test_dumps_writes_other_text_as_unicode():
    text = dumps(Header(type='\u00e9 & \x7f')).decode()
    assert '<unicode><![CDATA[\u00e9 & \x7f]]></unicode>' in text


def test_dumps_base64_encodes_text_xml_cannot_hold():
    text = dumps(Header(type='a\x01')).decode()
    assert '<unicode encoding="base64">YQE=</unicode>' in text


def test_dumps_writes_printable_bytes_as_string():
    text = dumps(Header(type=b'abc')).decode()
    assert '<string>abc</string>' in text


def test_dumps_base64_encodes_unprintable_bytes():
    text = dumps(Header(type=b'\x00\xff')).decode()
    assert '<string encoding="base64">AP8=</string>' in text


def test_dumps_writes_booleans_as_true_and_false_elements():
    text = dumps(Header(headers={'yes': True, 'no': False})).decode()
    assert '<true/>' in text
    assert '<false/>' in text
    assert '<int>' not in text


def test_dumps_writes_ints_beyond_64_bits_as_long():
    text = dumps(Header(headers={
        'big': 2 ** 63, 'small': -2 ** 63 - 1, 'max': 2 ** 63 - 1})).decode()
    assert '<long>9223372036854775808</long>' in text
    assert '<long>-9223372036854775809</long>' in text
    assert '<int>9223372036854775807</int>' in text


def test_dumps_writes_floats_with_repr():
    text = dumps(Header(timestamp=0.1)).decode()
    assert '<float>0.1</float>' in text


def test_dumps_writes_empty_collections_as_empty_elements():
    text = dumps(Header(headers={'ab': [], 'cd': ()})).decode()
    assert '<list />' in text
    assert '<tuple />' in text
    assert '<dictionary />' in dumps(Header(headers={})).decode()


def test_dumps_writes_dates_and_decimals_as_iso_text():
    moment = datetime.datetime(2011, 7, 14, 12, 15, 0)
    header = Header(headers={
        'at': moment, 'day': moment.date(), 'price': decimal.Decimal('1.50')},
        timestamp=moment)
    result = round_trip(header)
    assert result.timestamp == '2011-07-14T12:15:00'
    assert result.headers == {
        'at': '2011-07-14T12:15:00', 'day': '2011-07-14', 'price': '1.50'}


def test_dumps_refuses_values_of_unknown_types():
    with pytest.raises(TypeError, match='set'):
        dumps(Header(headers={'ab': {1, 2}}))


# Round trips

def test_dumps_and_loads_round_trip_a_typical_outgoing_header():
    header = convert_header({
        'content_type': 'text/xml',
        'X-Filename': 'foo.xml',
        'references': '<a@host>\n<b@host>',
        'correlation_id': '<a@host>',
        'reply_to': 'answers',
    })
    assert header.message_id.startswith('<')
    result = round_trip(header)
    assert result == header
    assert isinstance(result.timestamp, int)


def test_dumps_and_loads_round_trip_the_sample_header():
    assert round_trip(SAMPLE_HEADER) == SAMPLE_HEADER


@pytest.mark.parametrize('text', TRICKY_TEXTS)
def test_dumps_and_loads_round_trip_tricky_text_values(text):
    assert round_trip(Header(message_id=text)).message_id == text
    assert round_trip_value(text) == text


@pytest.mark.parametrize('text', TRICKY_TEXTS)
def test_dumps_and_loads_round_trip_tricky_text_keys(text):
    assert round_trip(Header(headers={text: 1})).headers == {text: 1}


@pytest.mark.parametrize('data', [
    b'\x00', b'\xff\xfe', bytes(range(256)), b'abc\x01'])
def test_dumps_and_loads_round_trip_unprintable_bytes(data):
    assert round_trip_value(data) == data


def test_loads_returns_printable_bytes_as_text():
    assert round_trip_value(b'abc') == 'abc'


def test_headers_none_and_empty_dict_stay_apart():
    assert round_trip(Header(headers=None)).headers is None
    assert round_trip(Header(headers={})).headers == {}


@pytest.mark.parametrize('value', [
    None, True, False, 0, -1, 2 ** 31, 2 ** 100, -2 ** 100, 1.5, -0.0,
    float('inf'), [], (), {},
    [1, 'two', [3.0, None]],
    (1, ('nested',), []),
    {'inner': {'deeper': {'x-y': [True, {'a b': b'\x00'}]}}},
    [{'ab': 1}, {}, ['<&]]>\r']],
])
def test_dumps_and_loads_round_trip_nested_values(value):
    result = round_trip_value(value)
    assert result == value
    assert type(result) is type(value)


def test_dumps_and_loads_round_trip_all_properties():
    header = Header(
        content_type='application/json', content_encoding='utf-8',
        delivery_mode=1, priority=9, correlation_id='<c@h>',
        reply_to='r', expiration='60000', message_id='<m@h>',
        timestamp=1310645700, type='t', user_id='guest', app_id='app',
        cluster_id='cluster', headers={'ab': 'cd'})
    assert round_trip(header) == header


# Reading what zope.xmlpickle wrote

def test_loads_reads_long_elements_as_int():
    header = loads(headers_document(
        '<dictionary><item key="ab"><long>12345678901234567890</long></item>'
        '<item key="cd"><long>7L</long></item></dictionary>'))
    assert header.headers == {'ab': 12345678901234567890, 'cd': 7}


def test_loads_reads_unicode_elements():
    header = loads(document(
        '<attribute name="type"><unicode>caf\u00e9</unicode></attribute>'))
    assert header.type == 'caf\u00e9'


def test_loads_reads_true_and_false():
    header = loads(headers_document(
        '<dictionary><item key="ab"><true/></item>'
        '<item key="cd"><false/></item></dictionary>'))
    assert header.headers == {'ab': True, 'cd': False}


def test_loads_reads_base64_strings_as_bytes():
    header = loads(document(
        '<attribute name="type">'
        '<string encoding="base64">AP8A\n/w==</string></attribute>'))
    assert header.type == b'\x00\xff\x00\xff'


def test_loads_reads_escaped_text():
    header = loads(document(
        '<attribute name="type"><string>a&#x0d;&lt;&amp;]]&gt;</string>'
        '</attribute>'))
    assert header.type == 'a\r<&]]>'


def test_loads_reads_both_item_forms_nested():
    header = loads(headers_document(
        '<dictionary>'
        '<item><key> <string>a-b</string> </key>'
        '<value><dictionary><item key="inner"><list><int>1</int>'
        '<tuple><string>x</string></tuple></list></item></dictionary>'
        '</value></item>'
        '</dictionary>'))
    assert header.headers == {'a-b': {'inner': [1, ('x',)]}}


def test_loads_resolves_references_to_earlier_values():
    header = loads(document(
        '<attribute name="correlation_id">'
        '<string id="o0"><![CDATA[<a@host>]]></string></attribute>'
        '<attribute name="headers"><dictionary><item key="references">'
        '<reference id="o0"/></item></dictionary></attribute>'))
    assert header.correlation_id == '<a@host>'
    assert header.headers == {'references': '<a@host>'}


def test_loads_reads_new_style_objects():
    data = document('').replace(b'classic_object', b'object')
    assert loads(data) == Header()


# Rejecting what is not a header file

@pytest.mark.parametrize('data, problem', [
    (b'', 'not well-formed'),
    (b'<pickle>', 'not well-formed'),
    (b'<other/>', '<other> where <pickle> belongs'),
    (b'<pickle><int>1</int></pickle>', '<int> where <classic_object>'),
    (b'<pickle><classic_object/></pickle>', '0 elements in <classic_object>'),
    (b'<pickle><classic_object><klass/><attributes/></classic_object>'
     b'</pickle>', '0 elements in <klass>'),
    (document('<attribute name="colour"><none/></attribute>'),
     "unknown attribute 'colour'"),
    (document('<attribute name="type"><none/></attribute>' * 2),
     "attribute 'type' twice"),
    (document('<item key="type"><none/></item>'),
     '<item> where <attribute> belongs'),
    (document('<attribute name="type">x<none/></attribute>'),
     'text in <attribute>'),
    (document('<attribute name="type"></attribute>'),
     '0 elements in <attribute>'),
    (document('<attribute name="type"><set/></attribute>'),
     'unknown element <set>'),
    (document('<attribute name="type"><int>x</int></attribute>'),
     "bad <int>: 'x'"),
    (document('<attribute name="type"><int><int/></int></attribute>'),
     'elements in <int>'),
    (document('<attribute name="type"><float></float></attribute>'),
     'bad <float>'),
    (document('<attribute name="type">'
              '<string encoding="rot13">nop</string></attribute>'),
     "unknown encoding 'rot13'"),
    (document('<attribute name="type">'
              '<string encoding="base64">*</string></attribute>'),
     'broken base64'),
    (document('<attribute name="type"><reference id="o1"/></attribute>'),
     "unknown id 'o1'"),
    (headers_document('<int>1</int>'), '"headers" is not a dictionary'),
    (headers_document('<dictionary><item><key><int>1</int></key>'
                      '</item></dictionary>'), '1 elements in <item>'),
    (headers_document('<dictionary><item><value><int>1</int></value>'
                      '<key><int>1</int></key></item></dictionary>'),
     '<value> where <key> belongs'),
    (b'<!DOCTYPE pickle [<!ENTITY big "x">]><pickle>&big;</pickle>',
     'document type declaration'),
])
def test_loads_rejects_documents_in_other_formats(data, problem):
    with pytest.raises(ValueError) as info:
        loads(data)
    assert problem in str(info.value)


# File names

@pytest.mark.parametrize('filename, expected', [
    ('foo.xml', 'foo.header.xml'),
    ('foo', 'foo.header'),
    ('test.data-1405340100.123456', 'test.data-1405340100.header.123456'),
    ('dir.d/foo', 'dir.d/foo.header'),
    ('a/b/foo.xml', 'a/b/foo.header.xml'),
])
def test_header_filename_puts_header_before_the_extension(
        filename, expected):
    assert header_filename(filename) == expected
    assert is_header_file(expected)


@pytest.mark.parametrize('filename', [
    'foo.header.xml', 'foo.header', 'a/b/foo.header.xml',
    'test.data-1405340100.header.123456'])
def test_is_header_file_recognises_header_files(filename):
    assert is_header_file(filename)


@pytest.mark.parametrize('filename', [
    'foo.xml', 'foo', 'header.xml', 'foo.headers.xml', 'a.header/foo.xml',
    'test.data-1405340100.123456'])
def test_is_header_file_rejects_body_files(filename):
    assert not is_header_file(filename)
