"""
Packaging for a third-party cc50tw backend.

``cc50tw.plugins`` is listed so that the plugin module is installed into
cc50tw's plugin package; it has no ``__init__.py`` here on purpose.
"""

from setuptools import setup

setup(
    name="cc50-echo",
    version="1.0.0",
    description="An echo backend for cc50tw, as an example of a backend plugin",
    packages=["cc50_echo", "cc50tw.plugins"],
    package_data={"cc50tw.plugins": ["cc50_echo_plugin.py"]},
    install_requires=["cc50tw"],
)
