"""Tests for gocept.amqprun.settings: the ISettings utility."""
import zope.interface.verify

from gocept.amqprun.interfaces import ISettings
from gocept.amqprun.settings import Settings


def test_settings_provide_ISettings():
    assert zope.interface.verify.verifyObject(ISettings, Settings())


def test_settings_are_a_read_mapping_keeping_key_case():
    settings = Settings()
    settings.update({'test.SETTING': 'Ümläuten'})
    assert settings['test.SETTING'] == 'Ümläuten'
    assert settings.get('test.setting') is None
    assert 'test.SETTING' in settings
