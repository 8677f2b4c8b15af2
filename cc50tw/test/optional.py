"""
Packages some unit tests need but a plain ``pip install cc50tw`` does not
bring (hypothesis, gguf, numpy: the ``test`` extra).

``trial cc50tw`` is how this project is tested, on a developer's plain
install too, so a missing optional package must not stop the run: the tests
that need it are skipped with a reason that says which extra to install.
Under CI (``CI=true``) the extra is always installed, so a missing package
means those tests silently stopped running; there the same tests fail with
the same reason instead, as the llama-server tests in ``tests/`` do.

Trial honours a class's ``skip`` attribute, but a test module must still
import without the package, and a hypothesis decorator cannot even be
written without hypothesis.  So a module defines its property tests only
when the package imports::

    HYPOTHESIS = OptionalPackage("hypothesis")

    if HYPOTHESIS.available:
        from hypothesis import given
        ...
        class RoundTripPropertyTests(SynchronousTestCase): ...
    else:
        HypothesisTests = HYPOTHESIS.standIn(__name__)

and the stand-in test case is what trial reports as skipped (or, under CI,
failed) in their place.  Tests that can be written without the package call
``requirePackage`` in ``setUp``, or set ``skip = PACKAGE.skip``.

This module must import nothing optional itself.
"""

from __future__ import annotations

import importlib
import os
from functools import cached_property

from twisted.trial.unittest import SkipTest, SynchronousTestCase

#: Installs every optional package the unit tests use.
INSTALL_TEST_EXTRA = "pip install 'cc50tw[test]'"


def underCI() -> bool:
    """Whether this is a CI run, where every optional test must run."""
    return os.environ.get("CI") == "true"


class OptionalPackage:
    """
    One optional package: whether it imports here, and if not, what to tell
    the person running the tests.
    """

    def __init__(self, name: str, extra: str = "test") -> None:
        self.name = name
        self.extra = extra

    @cached_property
    def reason(self) -> str | None:
        """Why tests that need the package cannot run here, or None when it imports (tried once, when first asked)."""
        try:
            # A real import, not importlib.util.find_spec: a package that is
            # present but broken (its own dependency missing) is missing too.
            importlib.import_module(self.name)
        except ImportError as e:
            return f"{self.name} is not installed ({e}); {self.install} to run these tests"
        return None

    @property
    def install(self) -> str:
        """The command that installs this package's extra."""
        return f"pip install 'cc50tw[{self.extra}]'"

    @property
    def available(self) -> bool:
        return self.reason is None

    @property
    def skip(self) -> str | None:
        """
        A value for a test case's ``skip`` attribute: the reason when the
        package is missing, except under CI, where the test must run (and
        fail through ``require``).
        """
        if self.reason is None or underCI():
            return None
        return self.reason

    def require(self) -> None:
        """
        For ``setUp`` or a test: return if the package imports, else skip
        with the reason, or fail with it under CI.
        """
        if self.reason is None:
            return
        if underCI():
            raise SynchronousTestCase.failureException(f"CI must run every test, but {self.reason}")
        raise SkipTest(self.reason)

    def standIn(self, module: str) -> type[SynchronousTestCase]:
        """
        A test case to bind, in ``module``, where tests that need this
        package could not be defined: trial reports it as skipped with the
        reason, or under CI as failed.  (A test module cannot raise
        ``SkipTest`` while it is imported: trial counts that as an error.)
        """
        package = self

        class StandIn(SynchronousTestCase):
            skip = package.skip

            def test_needsOptionalPackage(self) -> None:
                package.require()
                self.fail(f"{package.name} is installed: this stand-in should not have been defined")

        name = f"Without_{self.name.replace('.', '_')}"
        StandIn.__name__ = StandIn.__qualname__ = name
        StandIn.__module__ = module
        StandIn.__doc__ = f"Stands in for this module's tests that need {self.name}, which could not be defined."
        return StandIn


HYPOTHESIS = OptionalPackage("hypothesis")
GGUF = OptionalPackage("gguf")
NUMPY = OptionalPackage("numpy")

#: The test extra's packages that the unit tests use (pytest and
#: pytest-twisted are for ``tests/``, which trial does not run).
TEST_EXTRA = (HYPOTHESIS, GGUF, NUMPY)
