"""
Where cc50tw looks for backend plugins.

This follows Twisted's plugin convention with a package of our own rather
than ``twisted/plugins``: ``pluginPackagePaths`` adds every
``cc50tw/plugins/`` directory found on ``sys.path`` that has no
``__init__.py``, so a third-party distribution ships just
``cc50tw/plugins/its_backend.py`` and, once ``pip install``ed, is found by
``twisted.plugin.getPlugins(IBackendFactory, cc50tw.plugins)``.  A package of
our own keeps backend discovery from importing every twistd plugin on the
system, and keeps our dropin cache to ourselves.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # noqa: F821
__all__: list[str] = []
