"""The mesh dashboard's page: plain HTML, CSS and JavaScript in ``static/`` (no build step, no CDN, works
offline). The control plane's admin endpoint serves these files under ``/dashboard/``; the page polls
``/debug/dashboard/data`` (relative to itself, so it also works behind ``trafficmgr dashboard``'s local
proxy) every 2 seconds and builds the DOM with ``textContent`` only: nothing from the data is parsed as HTML.
"""

from __future__ import annotations

from pathlib import Path

#: The directory holding ``index.html``, ``dashboard.css`` and ``dashboard.js``.
STATIC_DIR: Path = Path(__file__).resolve().parent / "static"
#: The page's path on the admin endpoint.
PAGE_PATH = "/dashboard/"
#: The JSON data route the page reads (see docs: the dashboard data contract).
DATA_PATH = "/debug/dashboard/data"

__all__ = ["DATA_PATH", "PAGE_PATH", "STATIC_DIR"]
