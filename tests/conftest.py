"""Session-wide test setup (fixtures live in the *kit.py modules the tests import)."""

from __future__ import annotations

import os

# Ray reads its authentication mode once per process, when it first initialises, and clusters
# started by `ray start` require a token. Set it before any test imports Ray, so that every
# driver in this process sends the token whichever test touches Ray first.
os.environ.setdefault("RAY_AUTH_MODE", "token")
