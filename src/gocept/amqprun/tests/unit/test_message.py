"""Tests for gocept.amqprun.message: Message, Header and their helpers."""
import datetime
import re
import threading
import time

import pytest
import zope.interface.verify

from gocept.amqprun.interfaces import IMessage
from gocept.amqprun.interfaces import PublishRefused
from gocept.amqprun.message import Header
from gocept.amqprun.message import Message
from gocept.amqprun.message import check_size
from gocept.amqprun.message import convert_header
from gocept.amqprun.message import header_from_properties
from gocept.amqprun.message import make_message_id
from gocept.amqprun.message import redelivery_key
from gocept.amqprun.message import unique_token
from gocept.amqprun.tests.unit.fakes import FakeSession


MESSAGE_ID = re.compile(r'<(\d+\.)+gocept\.amqprun@.*>$')


def local_timestamp(*date):
    """Seconds since the epoch of a local date (as fromtimestamp reads it).
    """
    return int(time.mktime(datetime.datetime(*date).timetuple()))


def parent(message_id='orig message id', **headers):
    return Message(dict(message_id=message_id, **headers), b'',
                   delivery_tag='mytag')


# -- the message ------------------------------------------------------------

def test_message_provides_IMessage():
    message = Message({}, b'body')
    assert zope.interface.verify.verifyObject(IMessage, message)
    assert message.body == b'body'
    assert message.exchange == 'amq.topic'


def test_message_keeps_delivery_tag_routing_key_and_redelivered():
    message = Message({}, b'', delivery_tag=5, routing_key='route',
                      redelivered=True)
    assert message.delivery_tag == 5
    assert message.routing_key == 'route'
    assert message.redelivered is True


def test_message_routing_key_is_text_and_empty_becomes_none():
    assert Message({}, b'', routing_key='route.ü').routing_key == 'route.ü'
    assert Message({}, b'', routing_key='').routing_key is None


def test_message_exchange_can_be_given():
    assert Message({}, b'', exchange='other').exchange == 'other'


def test_message_body_may_be_none():
    assert Message({}, None).body is None


def test_message_text_body_is_encoded_as_utf8_with_content_encoding():
    message = Message({}, 'Ümläut')
    assert message.body == 'Ümläut'.encode('utf-8')
    assert message.header.content_encoding == 'utf-8'


def test_message_text_body_keeps_given_content_encoding():
    message = Message(dict(content_encoding='latin-1'), 'Ümläut')
    assert message.header.content_encoding == 'latin-1'
    assert message.body == 'Ümläut'.encode('latin-1')


def test_message_bytes_body_gets_no_content_encoding():
    message = Message({}, b'\xff')
    assert message.body == b'\xff'
    assert message.header.content_encoding is None


@pytest.mark.parametrize('body', [1, 1.5, [b'a'], {'a': 1}, object()])
def test_message_body_of_other_type_is_a_ValueError(body):
    with pytest.raises(ValueError, match='Message body must be bytes or str'):
        Message({}, body)


def test_message_accepts_a_header_object_unchanged():
    header = Header(message_id='given')
    message = Message(header, b'')
    assert message.header is header
    assert message.header.delivery_mode is None


def test_message_none_header_is_an_empty_dict():
    message = Message(None, b'')
    assert MESSAGE_ID.match(message.header.message_id)


def test_message_repr_names_id_routing_key_and_tag():
    message = Message(dict(message_id='<id@x>'), b'', delivery_tag=3,
                      routing_key='route')
    assert repr(message) == "<Message <id@x> routing_key='route' tag=3>"


# -- header conversion ------------------------------------------------------

def test_header_dict_is_converted_to_properties_and_application_headers():
    before = int(time.time())
    message = Message(
        dict(foo='bar', content_type='text/xml', app_id='myapp'), None)
    header = message.header
    assert header.headers == {'foo': 'bar'}
    assert header.content_type == 'text/xml'
    assert header.app_id == 'myapp'
    assert header.delivery_mode == 2
    assert isinstance(header.timestamp, int)
    assert before <= header.timestamp <= time.time()


def test_converted_header_contains_an_email_like_message_id():
    assert MESSAGE_ID.match(Message({}, b'').header.message_id)


def test_converted_headers_get_fresh_message_ids():
    assert (Message({}, b'').header.message_id
            != Message({}, b'').header.message_id)


def test_given_message_id_is_not_overwritten():
    assert Message(dict(message_id='myid'), b'').header.message_id == 'myid'


def test_given_delivery_mode_and_timestamp_win_over_defaults():
    header = Message(dict(delivery_mode=1, timestamp=12345), b'').header
    assert header.delivery_mode == 1
    assert header.timestamp == 12345


def test_converted_header_has_no_default_content_type():
    assert Message({}, b'').header.content_type is None


def test_headers_key_is_merged_into_application_headers():
    header = convert_header(dict(headers={'a': 1}, b=2))
    assert header.headers == {'a': 1, 'b': 2}


def test_application_headers_key_is_merged_too():
    header = convert_header(dict(application_headers={'a': 1}, b=2))
    assert header.headers == {'a': 1, 'b': 2}


def test_converted_header_without_extra_keys_has_empty_headers():
    assert convert_header({}).headers == {}


def test_convert_header_does_not_change_the_given_dict():
    given = dict(foo='bar', headers={'a': 1}, message_id='x')
    convert_header(given)
    assert given == dict(foo='bar', headers={'a': 1}, message_id='x')


def test_application_headers_is_an_alias_of_headers():
    header = Header(headers={'a': 1})
    assert header.application_headers == {'a': 1}
    header.application_headers = {'b': 2}
    assert header.headers == {'b': 2}


def test_header_with_unknown_property_is_a_TypeError():
    with pytest.raises(TypeError, match='colour'):
        Header(colour='blue')


def test_header_properties_are_the_set_ones_for_the_amqp_client():
    header = Header(headers={'x': 'y'}, message_id='id', timestamp=12.75,
                    delivery_mode=2)
    assert header.properties() == dict(
        message_id='id', timestamp=12, delivery_mode=2,
        application_headers={'x': 'y'})


def test_header_properties_leave_out_empty_application_headers():
    assert Header(headers={}, message_id='id').properties() == dict(
        message_id='id')


def test_header_from_properties_of_a_delivery():
    header = header_from_properties(dict(
        message_id='id', content_type='text/plain', timestamp=42,
        application_headers={'references': 'a'}))
    assert header.message_id == 'id'
    assert header.content_type == 'text/plain'
    assert header.timestamp == 42
    assert header.headers == {'references': 'a'}
    assert header.delivery_mode is None


def test_header_from_properties_without_application_headers():
    assert header_from_properties({}).headers is None


def test_headers_compare_by_value():
    assert Header(message_id='a', headers={'x': 1}) == Header(
        message_id='a', headers={'x': 1})
    assert Header(message_id='a') != Header(message_id='b')
    assert Header(message_id='a') != 'a'


def test_header_repr_shows_set_values():
    assert repr(Header(message_id='a')) == "<Header message_id='a'>"


def test_make_message_id_is_email_like():
    assert MESSAGE_ID.match(make_message_id())


# -- generate_filename ------------------------------------------------------

def test_generate_filename_unique_keeps_microsecond_precision():
    message = Message({}, b'')
    seconds = message.generate_filename('${unique}').split('-')[0]
    whole, fraction = seconds.split('.')
    assert len(fraction) == 6
    assert abs(float(seconds) - time.time()) < 60


def test_generate_filename_formats_header_timestamp_as_date():
    message = Message(dict(timestamp=local_timestamp(2011, 7, 14, 12)), b'')
    assert message.generate_filename('${date}') == '2011-07-14'


def test_generate_filename_without_timestamp_uses_today():
    message = Message(Header(), b'')
    assert message.generate_filename('${date}') == (
        datetime.date.today().strftime('%Y-%m-%d'))


def test_generate_filename_substitutes_pattern():
    message = Message(
        dict(message_id='myid', timestamp=local_timestamp(2011, 7, 14, 12)),
        b'', routing_key='routing')
    routing_key, date, msgid, unique = message.generate_filename(
        '${routing_key}_${date}_${msgid}_${unique}').split('_')
    assert routing_key == 'routing'
    assert date == '2011-07-14'
    assert msgid == 'myid'
    assert float(unique.split('-')[0])


def test_generate_filename_substitutes_x_filename_header():
    message = Message({'X-Filename': 'report.xml'}, b'')
    assert message.generate_filename('in/${xfilename}') == 'in/report.xml'


def test_generate_filename_substitutes_empty_text_for_missing_values():
    message = Message(Header(), b'')
    assert message.generate_filename(
        '[${msgid}][${xfilename}][${routing_key}]') == '[][][]'


def test_generate_filename_unknown_variable_is_a_KeyError():
    with pytest.raises(KeyError):
        Message({}, b'').generate_filename('${nonesuch}')


def test_unique_tokens_differ_across_threads():
    tokens = []

    def collect():
        tokens.extend(unique_token() for _ in range(500))

    threads = [threading.Thread(target=collect) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(tokens)) == 2000


# -- reference --------------------------------------------------------------

def test_reference_sets_correlation_id_to_parent_message_id():
    message = Message({}, b'')
    message.reference(parent())
    assert message.header.correlation_id == 'orig message id'


def test_reference_keeps_existing_correlation_id():
    message = Message(dict(correlation_id='mine'), b'')
    message.reference(parent())
    assert message.header.correlation_id == 'mine'


def test_reference_sets_references_to_parent_id_when_parent_has_none():
    message = Message({}, b'')
    message.reference(parent())
    assert message.header.headers['references'] == 'orig message id'


def test_reference_appends_parent_id_to_parents_references():
    message = Message({}, b'')
    message.reference(parent(references='a\nb'))
    assert message.header.headers['references'] == 'a\nb\norig message id'


def test_reference_when_parent_has_only_other_headers():
    message = Message({}, b'')
    message.reference(parent(**{'X-Foo': 'bar'}))
    assert message.header.headers['references'] == 'orig message id'


def test_reference_treats_empty_parent_references_as_none():
    message = Message({}, b'')
    message.reference(parent(references=''))
    assert message.header.headers['references'] == 'orig message id'


def test_reference_keeps_existing_references_header():
    message = Message(dict(references='mine'), b'')
    message.reference(parent(references='a'))
    assert message.header.headers['references'] == 'mine'


def test_reference_works_when_own_headers_are_none():
    message = Message(Header(), b'')
    message.reference(parent())
    assert message.header.headers == {'references': 'orig message id'}


def test_reference_does_nothing_when_parent_has_no_message_id():
    message = Message({}, b'')
    message.reference(Message(Header(), b''))
    assert message.header.correlation_id is None
    assert 'references' not in message.header.headers


@pytest.mark.parametrize('not_a_message', [None, 'text', object()])
def test_reference_does_nothing_for_non_messages(not_a_message):
    message = Message({}, b'')
    message.reference(not_a_message)
    assert message.header.correlation_id is None
    assert message.header.headers == {}


# -- acknowledge ------------------------------------------------------------

def test_acknowledge_without_session_is_a_RuntimeError():
    with pytest.raises(RuntimeError, match='No channel set for acknowledge'):
        Message({}, b'').acknowledge()


def test_acknowledge_asks_the_session_to_ack_with_the_commit():
    message = Message({}, b'', delivery_tag=1)
    message._session = session = FakeSession()
    message.acknowledge()
    assert session.acknowledged == [message]


def test_check_size_accepts_a_body_of_the_limit():
    check_size(Message({}, b'x' * 10), 10)
    check_size(Message({}, None), 10)


def test_check_size_without_limit_accepts_anything():
    check_size(Message({}, b'x' * 10), 0)


def test_check_size_names_size_and_limit_of_a_larger_body():
    message = Message({'message_id': '<big@x>'}, b'x' * 11,
                      routing_key='big')
    with pytest.raises(PublishRefused) as info:
        check_size(message, 10)
    assert str(info.value) == (
        "Cannot publish message <big@x> to exchange 'amq.topic' with "
        "routing key 'big': its body is 11 bytes, above max_message_size 10")


def test_redelivery_key_is_the_message_id_or_a_hash_of_the_content():
    assert redelivery_key(Message({'message_id': '<a@b>'}, b'')) == '<a@b>'
    assert redelivery_key(Message(Header(), b'x', routing_key='r')) == \
        redelivery_key(Message(Header(), b'x', routing_key='r'))
