"""
Tests for cc50tw, run with ``trial cc50tw``.

Property tests use hypothesis (the ``test`` extra; without it they are
skipped, see ``cc50tw.test.optional``); under CI its examples are
derandomized so a failure there reproduces exactly on a developer's machine.
"""

import os

from cc50tw.test.optional import HYPOTHESIS

if HYPOTHESIS.available:
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    settings.register_profile("dev", deadline=None)
    settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")
