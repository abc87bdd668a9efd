"""Settings: the ``<settings>`` section as an ISettings utility.

Runs on: any thread (read-only after start-up).
"""
import zope.interface

import gocept.amqprun.interfaces


@zope.interface.implementer(gocept.amqprun.interfaces.ISettings)
class Settings(dict):
    """A dict of text keys (case kept) and text values."""
