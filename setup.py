"""Packaging for gocept.amqprun."""
import os

from setuptools import find_namespace_packages
from setuptools import setup


def read(*names):
    """Return the text of a file next to this one."""
    here = os.path.dirname(__file__)
    with open(os.path.join(here, *names), encoding='utf-8') as f:
        return f.read()


TESTING = ['cryptography', 'pytest', 'pytest-timeout']
# ``patch = subprocess`` (see .coveragerc) needs coverage 7.10.
TEST = TESTING + ['coverage >= 7.10', 'zope.security', 'zc.buildout',
                  'zope.testrunner', 'prometheus_client', 'ZODB',
                  'zope.sqlalchemy', 'SQLAlchemy', 'psycopg[binary]']
#: The ZODB helpers of gocept.amqprun.testing.database.
DATABASE = ['ZODB']
DOCS = ['Sphinx', 'repoze.sphinx.autointerface']

setup(
    name='gocept.amqprun',
    version='2.0.0.dev0',
    description='ZTK-integrated daemon framework for AMQP (RabbitMQ) '
                'message handlers',
    long_description=read('README.rst') + '\n\n' + read('CHANGES.rst'),
    long_description_content_type='text/x-rst',
    license='ZPL-2.1',
    keywords='amqp rabbitmq zope ztk daemon worker',
    classifiers=[
        'Development Status :: 4 - Beta',
        'Framework :: Zope :: 3',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3 :: Only',
        'Programming Language :: Python :: 3.11',
        'Topic :: System :: Networking',
    ],
    package_dir={'': 'src'},
    packages=find_namespace_packages('src', include=['gocept.*']),
    include_package_data=True,
    package_data={'gocept.amqprun': ['*.xml', '*.zcml', 'tests/*.conf',
                                     'tests/*.zcml']},
    zip_safe=False,
    python_requires='>=3.9',
    install_requires=[
        # connection.py uses internals (buffer_reads, OpChannel, publish)
        'amqp >= 5.1, < 5.5',
        'setuptools',
        'transaction >= 3.0',
        'ZConfig >= 3.6',
        'zdaemon',
        'zope.component[zcml]',
        'zope.configuration',
        'zope.event',
        'zope.exceptions',
        'zope.interface',
        'zope.schema',
    ],
    extras_require={
        'security': ['zope.security'],
        'writefiles': [],
        'readfiles': [],
        'metrics': ['prometheus_client'],
        'testing': TESTING,
        'database': DATABASE,
        'test': TEST,
        'docs': DOCS,
    },
    entry_points={
        'console_scripts': [
            'server = gocept.amqprun.main:main',
            'amqprun-send = gocept.amqprun.send:main',
            'amqprun-status = gocept.amqprun.status:main',
        ],
        'pytest11': [
            'gocept.amqprun.testing.pytest = gocept.amqprun.testing.pytest',
        ],
    },
)
