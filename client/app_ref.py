"""Which ClientApp a device runs, named without loading it.

The runtime (before any task: which codecs to announce at Join), the CLI (the
`--app` default) and the app runner (which app gets the compression mod) all
need the name; this module imports nothing, so none of them pulls in Flower
or torch for it.
"""

from __future__ import annotations

DEFAULT_APP_REF = "fedge.client.client_app:app"
"""fedge's own ClientApp; the runner runs it with the compression mod added."""
