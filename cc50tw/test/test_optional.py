"""
Tests for cc50tw.test.optional: what a missing optional package does to a
``trial cc50tw`` run (a skip naming the extra; under CI, a failure).
"""

from __future__ import annotations

import os

from twisted.trial.reporter import TestResult
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from cc50tw.test import optional
from cc50tw.test.optional import INSTALL_TEST_EXTRA, TEST_EXTRA, OptionalPackage

MISSING = "cc50tw_test_no_such_package"


class OptionalPackageTests(SynchronousTestCase):
    def setCI(self, value: str | None) -> None:
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "CI"})
        if value is not None:
            os.environ["CI"] = value

    def test_installed(self) -> None:
        package = OptionalPackage("json")
        self.assertTrue(package.available)
        self.assertIsNone(package.reason)
        self.assertIsNone(package.skip)
        package.require()

    def test_missingSkipsNamingTheExtra(self) -> None:
        self.setCI(None)
        package = OptionalPackage(MISSING)
        self.assertFalse(package.available)
        assert package.reason is not None
        self.assertIn(INSTALL_TEST_EXTRA, package.reason)
        self.assertIn(MISSING, package.reason)
        self.assertEqual(package.skip, package.reason)
        error = self.assertRaises(SkipTest, package.require)
        self.assertEqual(str(error), package.reason)

    def test_otherExtra(self) -> None:
        reason = OptionalPackage(MISSING, extra="bench").reason
        assert reason is not None
        self.assertIn("pip install 'cc50tw[bench]'", reason)

    def test_missingFailsUnderCI(self) -> None:
        """CI installs the extra, so a missing package there means tests silently stopped running."""
        self.setCI("true")
        package = OptionalPackage(MISSING)
        self.assertIsNone(package.skip)
        error = self.assertRaises(self.failureException, package.require)
        self.assertIn("CI must run every test", str(error))
        self.assertIn(INSTALL_TEST_EXTRA, str(error))

    def test_onlyCITrueIsCI(self) -> None:
        self.setCI("1")
        self.assertFalse(optional.underCI())
        self.setCI("true")
        self.assertTrue(optional.underCI())

    def test_standInIsNamedForTheModule(self) -> None:
        self.setCI(None)
        standIn = OptionalPackage(MISSING).standIn(__name__)
        self.assertEqual(standIn.__module__, __name__)
        self.assertEqual(standIn.__name__, f"Without_{MISSING}")
        self.assertIn(INSTALL_TEST_EXTRA, str(standIn.skip))

    def test_standInFailsUnderCI(self) -> None:
        self.setCI("true")
        standIn = OptionalPackage(MISSING).standIn(__name__)
        self.assertIsNone(standIn.skip)
        result = TestResult()
        standIn("test_needsOptionalPackage").run(result)
        self.assertEqual((len(result.failures), len(result.skips)), (1, 0))
        self.assertIn(INSTALL_TEST_EXTRA, str(result.failures[0][1]))

    def test_standInSkips(self) -> None:
        self.setCI(None)
        result = TestResult()
        OptionalPackage(MISSING).standIn(__name__)("test_needsOptionalPackage").run(result)
        self.assertEqual((len(result.failures), len(result.skips)), (0, 1))


class TestExtraTests(SynchronousTestCase):
    """
    Every package of the test extra that the unit tests use is installed:
    here a missing one is reported once, by name, however its own tests
    skip (and fails the run under CI).
    """

    def test_testExtraInstalled(self) -> None:
        missing = [package.reason for package in TEST_EXTRA if package.reason is not None]
        if missing:
            if optional.underCI():
                self.fail("CI must run every test, but " + "; ".join(missing))
            raise SkipTest("; ".join(missing))
