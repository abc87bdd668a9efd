"""Sphinx configuration of the gocept.amqprun documentation.

Build with ``tox -e docs`` or ``./dev.sh docs``: HTML into
``docs/_build/html`` and the doctests of the narrative chapters, both with
warnings as errors.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '_ext'))

project = 'gocept.amqprun'
author = 'gocept gmbh & co. kg and contributors'
copyright = '2011-2026, ' + author  # noqa: A001 (the name Sphinx reads)

try:
    from importlib.metadata import version as _version
    release = _version('gocept.amqprun')
except Exception:  # pragma: no cover (docs built without installing)
    release = 'unknown'
version = release

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.doctest',
    'repoze.sphinx.autointerface',
    'amqprun_sphinx',
]

exclude_patterns = ['_build']
templates_path = []
html_static_path = []
html_theme = 'alabaster'
html_title = 'gocept.amqprun %s' % release
html_theme_options = {
    'description': 'AMQP message handlers in a ZTK daemon',
    'fixed_sidebar': True,
}

# API pages: signatures as written, members in source order, nothing from
# the rest of the world (no network here).
autodoc_member_order = 'bysource'
autoclass_content = 'class'
add_module_names = True

# Doctests: every narrative example runs against the real package, but never
# a broker; each document gets a fresh global component registry.
doctest_global_setup = '''
import zope.component.globalregistry
zope.component.globalregistry.base.__init__('base')
'''
doctest_global_cleanup = '''
import zope.component.globalregistry
zope.component.globalregistry.base.__init__('base')
'''

# Broken cross-references are errors (with -W), so a public name that moves
# breaks the build instead of the links. Names that other engineers may
# move to another module are spelled once, here and in api.rst.
nitpicky = True
nitpick_ignore_regex = [
    # Outside this package (no intersphinx: the build needs no network).
    (r'py:.*', r'(zope|transaction|ZConfig|amqp|unittest|ssl|threading)\..*'),
    (r'py:class', r'(Exception|object|dict|str|bytes|callable)'),
    # Internal names that public docstrings mention.
    (r'py:class', r'gocept\.amqprun\.message\.Header'),
]
rst_epilog = '''
.. |RetryPolicy| replace:: :class:`~gocept.amqprun.retry.RetryPolicy`
'''
