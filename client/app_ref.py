"""Which ClientApp a device runs by default, named without loading it.

The CLI (the `--app` default) and the runtime need the name before any task
arrives; this module imports nothing, so neither pulls in Flower or torch for
it. The name has no special meaning beyond being the default: the app it names
carries its own compression mod, so the runtime runs every app as it is.
"""

from __future__ import annotations

DEFAULT_APP_REF = "fedge.client.client_app:app"
"""fedge's own ClientApp (it compresses wherever it runs)."""
