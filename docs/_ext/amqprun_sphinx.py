"""Sphinx directives that keep the reference chapters true to the code.

``.. zcml-directive:: NAMESPACE NAME SCHEMA``
    Renders the attributes of a ZCML directive from its schema: the field
    titles and descriptions in ``gocept.amqprun.zcml`` are the reference.

``.. zconfig-section:: SECTIONTYPE``
    Wraps the hand-written description of one ZConfig section type (a
    definition list, one term per key: ````key```` followed by
    ``(required)``, ``(optional)`` or ``(default ``value``)``) and checks
    it against the schema: every key of the section type is described,
    no other key is, and the stated defaults are the schema's. A mismatch
    is a warning, so the docs build (``-W``) fails.
"""
import re

import docutils.nodes
import docutils.statemachine
import sphinx.util
import sphinx.util.docutils
import zope.interface
import zope.schema


log = sphinx.util.logging.getLogger(__name__)

# The ZConfig schema of the ``server`` script (kept here so that a move of
# the module is a one-line fix).
ZCONFIG_SCHEMA_MODULE = 'gocept.amqprun.config'

_TERM = re.compile(
    r'^``(?P<key>[A-Za-z0-9_.-]+)``'
    r'(?:\s+\((?P<what>required|optional|default ``(?P<default>[^`]*)``)\))?'
    r'\s*$')


def _resolve(dotted):
    module, _, name = dotted.rpartition('.')
    return getattr(__import__(module, fromlist=[name]), name)


def _schema_keys(sectiontype_name):
    """{key: (required, default or None)} of a ZConfig section type."""
    import ZConfig
    schema = ZConfig.loadSchema(_resolve(ZCONFIG_SCHEMA_MODULE + '.SCHEMA'))
    keys = {}
    for name, info in schema.gettype(sectiontype_name):
        default = info.getdefault()
        default = getattr(default, 'value', default)
        keys[name] = (info.minOccurs > 0, default)
    return keys


class ZConfigSection(sphinx.util.docutils.SphinxDirective):
    """Check a section type's key descriptions against the schema."""

    required_arguments = 1
    has_content = True

    def run(self):
        sectiontype = self.arguments[0]
        documented = {}
        for line in self.content:
            if not line or line[0].isspace():
                continue
            match = _TERM.match(line)
            if match is None:
                self._warn('%s: cannot read the key term %r' % (
                    sectiontype, line))
                continue
            documented[match.group('key')] = match
        try:
            keys = _schema_keys(sectiontype)
        except KeyError:
            self._warn('unknown ZConfig section type %r' % sectiontype)
            keys = {}
        for key, (required, default) in keys.items():
            match = documented.get(key)
            if match is None:
                self._warn('<%s> key %r is not documented' % (
                    sectiontype, key))
                continue
            what = match.group('what')
            if required and what != 'required':
                self._warn('<%s> key %r is required; say "(required)"' % (
                    sectiontype, key))
            elif not required and what == 'required':
                self._warn('<%s> key %r is optional' % (sectiontype, key))
            elif default is not None and match.group('default') != default:
                self._warn('<%s> key %r defaults to %r; say "(default '
                           '``%s``)"' % (sectiontype, key, default, default))
            elif default is None and match.group('default') is not None:
                self._warn('<%s> key %r has no default' % (sectiontype, key))
        for key in sorted(set(documented) - set(keys)):
            self._warn('<%s> has no key %r' % (sectiontype, key))
        container = docutils.nodes.container(
            classes=['zconfig-section', 'zconfig-' + sectiontype])
        self.state.nested_parse(self.content, self.content_offset, container)
        return [container]

    def _warn(self, text):
        log.warning(text, location=self.get_location())


class ZCMLDirective(sphinx.util.docutils.SphinxDirective):
    """The attributes of a ZCML directive, from its schema's fields."""

    required_arguments = 3

    def run(self):
        namespace, name, schema_name = self.arguments
        schema = _resolve(schema_name)
        if not (isinstance(schema, zope.interface.interface.InterfaceClass)):
            self._warn('%s is not an interface' % schema_name)
            return []
        lines = [
            '``<%s>`` in the namespace ``%s`` (schema ``%s``).' % (
                name, namespace, schema_name),
            '',
        ]
        for field_name, field in zope.schema.getFieldsInOrder(schema):
            if field.required:
                state = 'required'
            elif field.default not in (None, ''):
                state = 'optional, default ``%s``' % field.default
            else:
                state = 'optional'
            if not field.title or not field.description:
                self._warn('%s.%s needs a title and a description' % (
                    schema_name, field_name))
            lines.append('``%s`` (%s)' % (field_name, state))
            lines.append('    **%s.** %s' % (
                field.title, ' '.join(str(field.description).split())))
            lines.append('')
        content = docutils.statemachine.StringList(
            lines, source='<%s schema>' % schema_name)
        container = docutils.nodes.container(classes=['zcml-directive'])
        self.state.nested_parse(content, 0, container)
        return [container]

    def _warn(self, text):
        log.warning(text, location=self.get_location())


def setup(app):
    app.add_directive('zconfig-section', ZConfigSection)
    app.add_directive('zcml-directive', ZCMLDirective)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
