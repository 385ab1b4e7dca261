"""A dispatcher module whose import lasts until the test sets ``RELEASE``, so that other
callers arrive while it is being loaded."""

from __future__ import annotations

from tests.helpers import dispatch_targets

dispatch_targets.IMPORTING.set()
if not dispatch_targets.RELEASE.wait(30):
    raise RuntimeError("the test never released the import")

dispatch = dispatch_targets.record
