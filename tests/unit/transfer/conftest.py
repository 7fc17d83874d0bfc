"""Puts transfer_helpers on the path for the transfer unit tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # transfer_helpers
