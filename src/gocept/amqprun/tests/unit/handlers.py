"""Handlers and probes that the ZCML of the unit tests registers.

They live in a module of their own so that ZCML (which imports by dotted
name) and the tests see the very same objects.
"""
import zope.component

from gocept.amqprun.handler import declare
from gocept.amqprun.interfaces import ISettings


def function(message):
    return None


basic = declare('test.queue', 'test.routing')(function)
same_queue_1 = declare('test.same', 'test.one')(function)
same_queue_2 = declare('test.same', 'test.two')(function)

#: What ``settings_probe`` saw when ZCML ran it.
seen_settings = []


def settings_probe():
    """A utility factory: records the ISettings utility at ZCML time."""
    seen_settings.append(zope.component.queryUtility(ISettings))
    return object()
